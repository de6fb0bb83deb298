"""Whisper encoder + adaptor -> one ONNX graph: log-mel (1, n_mels, T) in, LLM embedding rows (R, D) out.

The contract (names, dynamic axis, dtypes) is declared here and checked after export against torch.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runtime.audio import AudioGeometry
from .staging import probe_audio  # noqa: F401 (export.bundle's probe too)

log = logging.getLogger(__name__)

INPUT = "mel"  # (1, n_mels, n_frames) float32
OUTPUT = "embeddings"  # (n_rows, n_embd) float32
OPSET = 17


class ExportError(RuntimeError):
    pass


class AudioEncoderGraph(nn.Module):
    """What the runtime runs per 30 s chunk: encoder on the real length, then the adaptor."""

    def __init__(self, encoder: nn.Module, adaptor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.adaptor = adaptor

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.adaptor(self.encoder(mel))[0]  # (1, n_mels, T) -> (R, D)


@dataclass
class OnnxReport:
    path: Path
    precision: str
    max_abs_diff: float
    min_cosine: float


def export_audio_encoder(encoder: nn.Module, adaptor: nn.Module, geometry: AudioGeometry, path) -> None:
    """Write the fp32 graph with a dynamic frame axis."""
    graph = AudioEncoderGraph(encoder, adaptor).eval().float()
    dummy = torch.randn(1, geometry.n_mels, 300)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices; the result is verified instead
        torch.onnx.export(graph, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {2: "n_frames"}, OUTPUT: {0: "n_rows"}}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)


def quantize_int8(src, dst) -> None:
    """Dynamic int8 quantization of the encoder's MatMul weights (onnxruntime's own tooling). The adaptor stays
    fp32: it is a few percent of the compute, and its rows are what the LLM reads (quantized, a trained adaptor's
    rows fell to cosine 0.78 on speech)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
            if n.name.startswith("/adaptor/")]

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" notice; quality is verified after
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=keep)
    finally:
        root.setLevel(level)


def convert_fp16(src, dst) -> None:
    """fp16 weights and compute, fp32 input and output (onnxruntime's converter); for GPUs, slow on most CPUs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _sample_speech() -> np.ndarray | None:
    """The spoken sample questions shipped in runtime/samples, joined; None if they are missing."""
    from ..runtime.audio import AudioError, load_audio

    clips = []
    for path in sorted((Path(__file__).resolve().parent.parent / "runtime" / "samples").glob("*.wav")):
        try:
            clips.append(load_audio(path))
        except AudioError:
            continue
    return np.concatenate(clips) if clips else None


def verify_audio_encoder(encoder: nn.Module, adaptor: nn.Module, geometry: AudioGeometry, path,
                         precision: str = "fp32", frame_counts=(100, 301, 1000)) -> OnnxReport:
    """Run the graph and torch on the same random log-mel at several lengths; fail past tolerance."""
    import onnxruntime as ort

    from ..runtime.features import log_mel

    graph = AudioEncoderGraph(encoder, adaptor).eval().float()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst_abs, worst_cos = 0.0, 1.0
    speech = _sample_speech()
    for n in frame_counts:  # real speech: quantization error is judged where the graph will be used
        n_samples = n * geometry.hop_length
        x = np.tile(speech, n_samples // speech.size + 1)[:n_samples] if speech is not None else probe_audio(
            n_samples / geometry.sample_rate, seed=n)
        mel = torch.from_numpy(log_mel(x, geometry.n_mels))[None]
        with torch.no_grad():
            want = graph(mel).numpy()
        got = session.run([OUTPUT], {INPUT: mel.numpy()})[0]
        if got.shape != want.shape or got.shape[0] != geometry.n_rows_for_frames(n):
            raise ExportError(f"ONNX audio encoder gives {got.shape} rows for {n} frames, torch {want.shape}, "
                              f"geometry {geometry.n_rows_for_frames(n)}")
        worst_abs = max(worst_abs, float(np.abs(got - want).max()))
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-12)
        worst_cos = min(worst_cos, float(cos.min()))
    scale = float(np.abs(want).max())
    if precision == "fp32" and worst_abs > 1e-4 * max(1.0, scale):
        raise ExportError(f"fp32 ONNX audio encoder differs from torch by {worst_abs:.2e} (tolerance 1e-4)")
    if worst_cos < 0.99:
        raise ExportError(f"{precision} ONNX audio encoder has cosine {worst_cos:.4f} to torch (needs >= 0.99)")
    return OnnxReport(Path(path), precision, worst_abs, worst_cos)
