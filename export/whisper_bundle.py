"""A whisper-decoder bundle from a CTranslate2 Whisper directory and a GGUF LLM, with numpy, onnx and gguf only (no
torch): Whisper's encoder and decoder step as ONNX graphs (whisper_onnx.py), its vocabulary, the LLM GGUF as it
is (linked or copied), the prompt format read from the GGUF's chat template, and a manifest that describes it all.

The contract is checked before the bundle is moved into place: the graphs load in onnxruntime with the declared
inputs and outputs, and the bundle, loaded as the runtime loads it, transcribes a probe clip (for the default
bundle, the packaged sample must come out with the words it says).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import bundle as B
from ..runtime.audio import AudioGeometry, load_audio
from .staging import probe_audio, staged_bundle

log = logging.getLogger(__name__)

ROWS = ("soft", "hard")
PRECISIONS = ("int8", "fp16")
DEFAULT_ADAPTOR = {"kind": "whisper-decoder", "rows": "soft", "languages": ["en", "zh"], "pad_seconds": 0.5,
                   "begin": "", "end": "", "tuned": []}  # tuned: languages decoded with the Whisper LoRA


# The LLM was never taught to transcribe: asked to, a small one answers the question it reads instead. A system text
# and a few typed examples make it copy (BENCHMARKS.md: LLM vs Whisper's own words).
TRANSCRIBE_PROMPT = {
    "transcribe_instruction": "Repeat this text exactly:",
    "transcribe_system": "You repeat text exactly as it is given, word for word. You never answer it.",
    "transcribe_examples": [
        ["Repeat this text exactly:\nWhat is the capital of Spain?", "What is the capital of Spain?"],
        ["Repeat this text exactly:\nTell me a joke about cats.", "Tell me a joke about cats."],
        ["Repeat this text exactly:\n今天天气怎么样？", "今天天气怎么样？"],
        ["Repeat this text exactly:\n12乘以3等于多少？", "12乘以3等于多少？"],
        ["Repeat this text exactly:\nI don't know why you said that.", "I don't know why you said that."],
    ],
}


class BuildError(RuntimeError):
    """The built bundle does not do what it declares."""


@dataclass
class BuildReport:
    bundle: Path
    files: dict = field(default_factory=dict)  # name -> bytes
    checks: dict = field(default_factory=dict)


def adaptor_settings(settings: dict | None) -> dict:
    """DEFAULT_ADAPTOR updated with `settings`, checked."""
    cfg = dict(DEFAULT_ADAPTOR, **(settings or {}))
    if cfg["kind"] != "whisper-decoder":
        raise ValueError(f"this builder writes whisper-decoder bundles, the settings say {cfg['kind']!r}")
    if cfg["rows"] not in ROWS:
        raise ValueError(f"adaptor rows must be one of {ROWS}, got {cfg['rows']!r}")
    if not cfg["languages"] or not all(isinstance(x, str) for x in cfg["languages"]):
        raise ValueError(f"adaptor languages must be a non-empty list of Whisper language codes, got "
                         f"{cfg['languages']!r}")
    if not isinstance(cfg["tuned"], list) or not set(cfg["tuned"]) <= set(cfg["languages"]):
        raise ValueError(f"adaptor tuned must list some of its languages {cfg['languages']}, got {cfg['tuned']!r}")
    if not 0.0 <= float(cfg["pad_seconds"]) <= 30.0:
        raise ValueError(f"pad_seconds must lie in [0, 30], got {cfg['pad_seconds']}")
    unknown = sorted(set(cfg) - set(DEFAULT_ADAPTOR))
    if unknown:
        raise ValueError(f"unknown adaptor settings {unknown}; known: {sorted(DEFAULT_ADAPTOR)}")
    return cfg


def whisper_tokens(whisper_dir: Path) -> dict:
    """whisper_tokens.json's content from a CTranslate2 Whisper directory (vocabulary.txt, config.json)."""
    vocabulary, config = whisper_dir / "vocabulary.txt", whisper_dir / "config.json"
    if not vocabulary.is_file():
        raise FileNotFoundError(f"{whisper_dir} has no vocabulary.txt: expected a CTranslate2 Whisper directory")
    tokens = vocabulary.read_text(encoding="utf-8").split("\n")
    tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
    conf = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    return {"tokens": tokens, "suppress": conf.get("suppress_ids", []),
            "suppress_begin": conf.get("suppress_ids_begin", [])}


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where src and dst share a file system (the packaged GGUF is never written to), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_graphs(whisper_dir: Path, out: Path, weights=np.float16, lora=None) -> tuple[Path, Path, int]:
    """audio_encoder.onnx and text_decoder.onnx from the CTranslate2 weights -> their paths and n_mels. weights:
    the dtype the graphs store (float16: the packaged weights as they are, computed in float32). lora: a Whisper
    LoRA file (training/whisper_lora.py), in the decoder graph behind its lora_gate input."""
    import onnx

    from ..training.ct2 import (_model_bin, decoder_config_from_ct2, decoder_state_from_ct2,
                                encoder_config_from_ct2, encoder_state_from_ct2, float_variable, read_ct2)
    from .whisper_onnx import decoder_model, encoder_model

    variables = read_ct2(_model_bin(whisper_dir), spec="WhisperSpec")
    enc_cfg = encoder_config_from_ct2(variables)
    table_rows = variables["decoder/position_encodings/encodings"].shape[0]
    dec_cfg = decoder_config_from_ct2(variables, table_rows)
    dec_state = decoder_state_from_ct2(variables, dec_cfg)
    if lora is not None:
        from ..training.whisper_lora import read_lora

        lora = read_lora(lora)[:2]
    enc_path, dec_path = out / "audio_encoder.onnx", out / "text_decoder.onnx"
    onnx.save(encoder_model(encoder_state_from_ct2(variables, enc_cfg), enc_cfg, dec_state, dec_cfg, weights), enc_path)
    onnx.save(decoder_model(dec_state, dec_cfg, float_variable(variables, "decoder/embeddings/weight"), weights, lora),
              dec_path)
    return enc_path, dec_path, enc_cfg.n_mels


def quantized_graphs(whisper_dir: Path, out: Path, lora=None) -> tuple[Path, Path]:
    """The graphs with int8 weights for their matrix products (onnxruntime's dynamic quantization, activations
    quantized per call): 2.5x faster on CPUs with int8 dot products (BENCHMARKS.md). Written from float32 graphs,
    which are removed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scratch = out / "float32"
    scratch.mkdir()
    advice = _Drop("pre-processing before quantization")  # its shape inference cannot follow these graphs' shapes
    logging.getLogger().addFilter(advice)
    try:
        enc32, dec32, _ = write_graphs(whisper_dir, scratch, np.float32, lora)
        paths = out / "audio_encoder.int8.onnx", out / "text_decoder.int8.onnx"
        for src, dst in zip((enc32, dec32), paths):
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.getLogger().removeFilter(advice)
        shutil.rmtree(scratch, ignore_errors=True)
    return paths


class _Drop(logging.Filter):
    """Drops log records that contain a phrase (a library's advice that does not apply here)."""

    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def int8_agrees(reference: tuple, quantized: tuple, vocab, geometry, clips: list, cfg: dict) -> str | None:
    """None when the int8 graphs hear every clip as the reference graphs do (the same greedy tokens); else why not."""
    from ..runtime.whisper_decode import Transcriber

    kw = dict(languages=tuple(cfg["languages"]), pad_seconds=float(cfg["pad_seconds"]),
              tuned=tuple(cfg.get("tuned", ())))
    ref, q8 = Transcriber(*reference, vocab, geometry, **kw), Transcriber(*quantized, vocab, geometry, **kw)
    for i, clip in enumerate(clips):
        a, b = ref(clip), q8(clip)
        if a.tokens != b.tokens:
            return f"probe {i}: int8 heard {b.text!r}, the float graphs {a.text!r}"
    return None


def build_whisper_bundle(whisper_dir, llm_gguf, out, adaptor: dict | None = None, lora=None, row_map=None,
                         whisper_lora=None, int8_probes=(),
                         transcribe: dict | None = None, provenance: dict | None = None, probe=None,
                         expect: str | None = None, precision: str = "int8", overwrite: bool = False) -> BuildReport:
    """Write the bundle into `out` (atomically: a temporary directory beside it, renamed when checked).

    probe: audio (a path or 16 kHz samples) the built bundle must transcribe; expect: a phrase its transcript must
    hold (case and punctuation aside). Without a probe, a synthetic voiced signal checks that decoding ends.
    precision: "int8" (where the int8 graphs hear the probe and the synthetic clip as the float graphs do; the float
    graphs ship otherwise, and the manifest's checks say why) or "fp16" (float16 weights, float32 compute).
    transcribe: the transcription prompt's manifest keys (default TRANSCRIBE_PROMPT). whisper_lora: a LoRA of
    Whisper's decoder (training/whisper_tune.py), in its graph; lora: the LLM's, as a GGUF adapter. int8_probes:
    more audio the int8 graphs must hear as the float ones do (the tuned languages' samples)."""
    from ..runtime.llm import LLM
    from ..runtime.whisper_decode import WhisperVocab

    whisper_dir, llm_gguf, out = Path(whisper_dir), Path(llm_gguf), Path(out)
    cfg = adaptor_settings(adaptor)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not llm_gguf.is_file():
        raise FileNotFoundError(f"no GGUF LLM at {llm_gguf}")
    if bool(cfg["tuned"]) != (whisper_lora is not None):
        raise ValueError("a Whisper LoRA and the adaptor's tuned languages go together: name both or neither")
    report = BuildReport(out)
    with staged_bundle(out, overwrite) as tmp:
        log.info("writing Whisper's encoder and decoder graphs (ONNX)")
        enc_path, dec_path, n_mels = write_graphs(whisper_dir, tmp, lora=whisper_lora)
        tokens_path = tmp / "whisper_tokens.json"
        tokens_path.write_text(json.dumps(whisper_tokens(whisper_dir), ensure_ascii=False), encoding="utf-8")
        used = "fp16 weights, fp32 compute"
        if precision == "int8":
            log.info("quantizing Whisper's graphs to int8")
            quantized = quantized_graphs(whisper_dir, tmp, whisper_lora)
            clips = [load_audio(probe)] if probe is not None else []
            clips += [load_audio(p) for p in int8_probes]
            why = int8_agrees((enc_path, dec_path), quantized, WhisperVocab.from_file(tokens_path),
                              AudioGeometry(n_mels=n_mels, rows="tokens"), clips + [probe_audio(1.5)], cfg)
            report.checks["int8"] = why or "agrees with the float graphs on the probes"
            if why is None:
                os.replace(quantized[0], enc_path)
                os.replace(quantized[1], dec_path)
                used = "int8 weights (dynamic quantization), fp32 activations"
            else:
                log.warning("the int8 graphs fail the quality check (%s): shipping the float graphs", why)
                for path in quantized:
                    path.unlink()
        gguf_path = tmp / "llm.gguf"
        _link_or_copy(llm_gguf, gguf_path)
        files = {B.AUDIO_ENCODER: B.file_entry(enc_path) | {"precision": used},
                 B.TEXT_DECODER: B.file_entry(dec_path) | {"precision": used},
                 B.WHISPER_TOKENS: B.file_entry(tokens_path), B.LLM: B.file_entry(gguf_path) | {"type": "base"}}
        if lora is not None:
            shutil.copyfile(lora, tmp / "llm.lora.gguf")
            files[B.LLM_LORA] = B.file_entry(tmp / "llm.lora.gguf")
        if row_map is not None:
            shutil.copyfile(row_map, tmp / "row_map.npz")
            files[B.ROW_MAP] = B.file_entry(tmp / "row_map.npz")
        llm = LLM(gguf_path, n_ctx=256, n_batch=64)
        try:
            prompt, n_embd = llm.prompt_format(), llm.n_embd
        finally:
            llm.close()
        manifest = {"format": B.FORMAT, "version": B.VERSION, "adaptor": cfg,
                    "geometry": AudioGeometry(n_mels=n_mels, rows="tokens").to_dict(), "prompt": prompt.to_dict(),
                    **(TRANSCRIBE_PROMPT if transcribe is None else transcribe), "n_embd": n_embd, "files": files,
                    "provenance": dict(provenance or {}, whisper=str(whisper_dir), llm=str(llm_gguf))}
        if whisper_lora is not None:
            manifest["provenance"]["whisper_lora"] = B.sha256(whisper_lora)  # in the decoder's weights
        (tmp / B.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        report.checks.update(check_bundle(tmp, probe, expect))
        manifest["checks"] = report.checks
        (tmp / B.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        report.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return report


def check_bundle(path: Path, probe=None, expect: str | None = None) -> dict:
    """Load the bundle as the runtime does and transcribe the probe with Whisper's graphs: what it heard, and how
    many rows the LLM got for it. BuildError when the transcript lacks `expect`."""
    from ..runtime.chat import LLaSM
    from ..runtime.scoring import normalize

    samples = load_audio(probe) if probe is not None else probe_audio(1.5)
    model = LLaSM.load(path, n_ctx=512)
    try:
        heard = model.encoder.transcriber(samples)
        rows = model.encoder.rowmap(heard)
    finally:
        model.close()
    if not np.isfinite(rows).all():
        raise BuildError("the built bundle's rows are not finite")
    if expect is not None and normalize(expect, "en") not in normalize(heard.text, "en"):
        raise BuildError(f"the built bundle heard {heard.text!r} in its probe, expected {expect!r}")
    return {"probe_heard": heard.text, "probe_lang": heard.lang, "probe_rows": int(rows.shape[0])}
