"""Checkpoint -> bundle: audio_encoder.onnx + llm.gguf + manifest.json, each verified, written atomically."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..runtime import bundle as B
from ..runtime.llm import LLM
from ..runtime.prompt import Turn
from .onnx import (ExportError, convert_fp16, export_audio_encoder, quantize_int8,
                   verify_audio_encoder)
from .quantize import quantize_gguf
from .staging import probe_audio, staged_bundle

log = logging.getLogger(__name__)

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
GGUF_TYPES = ("auto", "base", "f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
# auto: "base" when the base LLM is a GGUF file (shipped untouched, LoRA as a GGUF adapter beside it), else f16


@dataclass
class ExportReport:
    bundle: Path
    files: dict = field(default_factory=dict)  # name -> size in bytes
    checks: dict = field(default_factory=dict)  # name -> measured value


def _check_llm_parity(model, tokenizer, gguf: Path, onnx_rows: np.ndarray, gguf_type: str,
                      lora: Path | None = None) -> dict:
    """llama.cpp vs torch next-token logits on one fixed audio + text prompt, and tokenization parity."""
    samples = probe_audio(1.5)
    segments = model.cfg.prompt.render([Turn("user", (samples, "What was said?"))])
    llm = LLM(gguf, n_ctx=1024, n_batch=256, lora_path=lora)
    try:
        embeds = []
        for seg in segments:
            if seg.is_audio:
                llm.eval_embeddings(onnx_rows)
                embeds.append(torch.from_numpy(onnx_rows))
            else:
                ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
                if llm.tokenize(seg.text) != ids:
                    raise ExportError(f"llama.cpp tokenizes {seg.text!r} differently from the training tokenizer")
                llm.eval_tokens(ids)
                with torch.no_grad():
                    embeds.append(model.embed_tokens(torch.tensor(ids)).float())
        got = llm.logits()
    finally:
        llm.close()
    want = model.logits(torch.cat(embeds)[None].to(next(model.llm.parameters()).dtype))[0, -1].float().numpy()
    max_diff = float(np.abs(got - want).max())
    rel = max_diff / float(np.abs(want).max() + 1e-6)
    p = np.exp(want - want.max()); p /= p.sum()
    q = np.exp(got - got.max()); q /= q.sum()
    kl = max(0.0, float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum()))  # >= 0 up to rounding
    tol = {"f32": 1e-3, "f16": 3e-2}.get(gguf_type)
    if tol is None:  # quantized: the loss is measured and reported, judged by the benchmarks
        log.info("%s GGUF%s: KL to torch %.4f, max logit difference %.3g", gguf_type, " + LoRA" if lora else "", kl,
                 max_diff)
    elif int(np.argmax(got)) != int(np.argmax(want)) or rel > tol:
        raise ExportError(f"{gguf_type} GGUF disagrees with torch: top-1 {int(np.argmax(got))} vs "
                          f"{int(np.argmax(want))}, max logit difference {max_diff:.3g} ({rel:.2%} of scale)")
    return {"llm_max_logit_diff": max_diff, "llm_kl": kl}


def export_bundle(checkpoint, out, onnx_precision: str = "fp32", gguf_type: str = "auto",
                  overwrite: bool = False, release: str | None = None,
                  release_digest: str | None = None) -> ExportReport:
    """release, release_digest: the name and digest of the shipped release checkpoint this bundle is built from,
    recorded in its provenance (the default bundle is rebuilt when the release it came from changes)."""
    from ..training.base import _local_path
    from ..training.checkpoint import load_checkpoint
    from .gguf import write_gguf
    from .lora_gguf import write_lora_gguf

    if onnx_precision not in ONNX_PRECISIONS:
        raise ValueError(f"onnx precision must be one of {ONNX_PRECISIONS}, got {onnx_precision!r}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    out = Path(out)
    model, tokenizer, ckpt = load_checkpoint(checkpoint)
    llm_mode = ckpt.get("llm_mode", "frozen")
    base_llm = _local_path(ckpt["base"]["llm"])
    base_is_gguf = base_llm.is_file() and base_llm.suffix == ".gguf"
    if gguf_type == "auto":
        gguf_type = "base" if base_is_gguf else "f16"
    if gguf_type == "base" and not base_is_gguf:
        raise ValueError(f"--gguf base needs a GGUF base LLM, the checkpoint's is {ckpt['base']['llm']}")
    if gguf_type == "base" and llm_mode == "full":
        raise ValueError("a fully fine-tuned LLM cannot ship as the base GGUF; choose f16, q8_0 or q4_k_m")
    model = model.float().eval()
    geometry = model.cfg.geometry
    report = ExportReport(out)
    with staged_bundle(out, overwrite) as tmp:
        onnx_path = tmp / "audio_encoder.onnx"
        log.info("exporting audio encoder + adaptor to ONNX")
        export_audio_encoder(model.encoder, model.adaptor, geometry, onnx_path)
        r = verify_audio_encoder(model.encoder, model.adaptor, geometry, onnx_path, "fp32")
        report.checks["onnx_fp32_max_abs_diff"] = r.max_abs_diff
        if onnx_precision != "fp32":
            q = tmp / f"audio_encoder.{onnx_precision}.onnx"
            (quantize_int8 if onnx_precision == "int8" else convert_fp16)(onnx_path, q)
            r = verify_audio_encoder(model.encoder, model.adaptor, geometry, q, onnx_precision)
            report.checks[f"onnx_{onnx_precision}_min_cosine"] = r.min_cosine
            os.replace(q, onnx_path)
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        from ..runtime.features import log_mel

        rows = session.run(None, {"mel": log_mel(probe_audio(1.5), geometry.n_mels)[None]})[0]
        gguf_path, lora_path = tmp / "llm.gguf", None
        if gguf_type == "base":
            log.info("shipping the base GGUF untouched (%s)", base_llm.name)
            shutil.copyfile(base_llm, gguf_path)
            if llm_mode == "lora":
                lora_path = tmp / "llm.lora.gguf"
                n = write_lora_gguf(model.llm, lora_path)
                log.info("LoRA adapter: %d matrices", n)
        else:
            full = tmp / "llm.f32.gguf"
            target = gguf_path if gguf_type in ("f32", "f16") else full
            log.info("writing %s GGUF", "f32" if target is full else gguf_type)
            merged = model.llm.merge_and_unload() if hasattr(model.llm, "peft_config") else model.llm
            write_gguf(merged, tokenizer, target, dtype="f32" if target is full else gguf_type)
            if target is full:
                log.info("quantizing to %s with llama.cpp", gguf_type)
                quantize_gguf(full, gguf_path, gguf_type)
                full.unlink()
        if hasattr(model.llm, "peft_config"):
            model.llm = model.llm.merge_and_unload()  # torch reference for the parity check
        report.checks.update(_check_llm_parity(model, tokenizer, gguf_path, rows, gguf_type, lora_path))
        files = {B.AUDIO_ENCODER: B.file_entry(onnx_path) | {"precision": onnx_precision},
                 B.LLM: B.file_entry(gguf_path) | {"type": gguf_type}}
        if lora_path:
            files[B.LLM_LORA] = B.file_entry(lora_path)
        manifest = {
            "format": B.FORMAT, "version": B.VERSION, "adaptor": {"kind": model.cfg.adaptor.kind},
            "geometry": geometry.to_dict(), "prompt": model.cfg.prompt.to_dict(),
            "transcribe_instruction": model.cfg.transcribe_instruction,
            "n_embd": int(model.llm.config.hidden_size),
            "files": files,
            "provenance": {"base": ckpt["base"], "llm_arch": model.cfg.llm_arch, "llm_mode": llm_mode,
                           "checkpoint": str(Path(checkpoint).resolve()),
                           "train_digest": ckpt.get("train", {}).get("digest"),
                           "train_step": ckpt.get("train", {}).get("step"), "release": release,
                           "release_digest": release_digest},
            "checks": report.checks,
        }
        (tmp / B.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        report.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return report
