"""A LoRA of Whisper's decoder as a file: low-rank pairs (A, B) per projection in an npz, with a JSON `meta` that
holds the scale (W x + scale B A x). Read with numpy alone: a bundle built without torch carries it in its decoder
graph (export/whisper_onnx.py), behind a gate.

Names follow the decoder state dicts of training/ct2.py: "layers.3.self_attn.q_proj" has "...lora_a" (rank, in)
and "...lora_b" (out, rank). whisper_tune.py trains them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "llasm-whisper-lora"


def save_lora(path, pairs: dict, scale: float, meta: dict | None = None) -> None:
    """pairs stored float16."""
    np.savez(path, meta=np.array(json.dumps(dict(meta or {}, format=FORMAT, scale=float(scale)))),
             **{k: np.asarray(v, np.float16) for k, v in pairs.items()})


def read_lora(path) -> tuple[dict, float, dict]:
    """(pairs, scale, meta) of a file save_lora wrote."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            pairs = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable Whisper LoRA: {e}") from None
    if meta.get("format") != FORMAT or "scale" not in meta:
        raise ValueError(f"{path} is not a Whisper LoRA (format {meta.get('format')!r})")
    return pairs, float(meta["scale"]), meta
