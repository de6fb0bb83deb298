"""GGUF quantization with llama.cpp's own quantizer (exposed by llama-cpp-python)."""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# name -> llama_cpp ftype constant name
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def quantize_gguf(src, dst, qtype: str, n_threads: int | None = None) -> None:
    """src (f32/f16 GGUF) -> dst quantized to qtype; dst is removed if quantization fails."""
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantization type must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    params.nthread = n_threads or (os.cpu_count() or 1)
    dst = Path(dst)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (code {rc})")
