"""Audio -> LLM embedding rows with onnxruntime: numpy log-mel per 30 s chunk, one graph run per chunk."""
from __future__ import annotations

import logging

import numpy as np

from .audio import AudioGeometry
from .features import log_mel

log = logging.getLogger(__name__)


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu is installed and sees a GPU, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class AudioEncoder:
    def __init__(self, path, geometry: AudioGeometry, n_threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if n_threads:
            opts.intra_op_num_threads = n_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's workers spin after a run by default; here llama.cpp's prefill comes next on the same cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers())
        self.geometry = geometry
        inp = self.session.get_inputs()[0]
        if inp.shape[1] != geometry.n_mels:
            raise ValueError(f"audio encoder takes {inp.shape[1]} mel bins, manifest says {geometry.n_mels}")
        self.n_embd = int(self.session.get_outputs()[0].shape[1])

    def features(self, samples: np.ndarray) -> list[np.ndarray]:
        """Per chunk: (1, n_mels, n_frames) float32."""
        return [log_mel(samples[s:e], self.geometry.n_mels)[None] for s, e in self.geometry.chunks(samples.size)]

    def encode(self, mels: list[np.ndarray]) -> np.ndarray:
        """-> (rows, n_embd) float32, C-contiguous, chunks concatenated."""
        rows = [self.session.run(None, {"mel": m})[0] for m in mels]
        return np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)

    def encode_heard(self, mels: list[np.ndarray]) -> tuple[np.ndarray, None]:
        """As encode; this adaptor hears no words (whisper-decoder's HeardEncoder returns what Whisper heard)."""
        return self.encode(mels), None

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return self.encode(self.features(samples))
