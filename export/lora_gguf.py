"""A peft LoRA adapter -> a GGUF LoRA adapter that llama.cpp applies on top of the untouched base GGUF.

Tensor names are the base tensor's GGUF name + `.lora_a` (r, n_in) / `.lora_b` (n_out, r); llama.cpp scales by
adapter.lora.alpha / r, as peft does.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .gguf import SUPPORTED, _rotate_half_to_interleaved, write_file

log = logging.getLogger(__name__)


def write_lora_gguf(peft_model, path) -> int:
    """Write the LoRA weights of a peft causal LM; -> number of adapted matrices."""
    import gguf
    import torch

    base = peft_model.get_base_model()
    config = base.config
    if config.model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture {config.model_type}; supported: {', '.join(SUPPORTED)}")
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    peft_cfg = peft_model.peft_config["default"]
    if getattr(peft_cfg, "use_dora", False) or getattr(peft_cfg, "use_rslora", False):
        raise ValueError("DoRA and rsLoRA adapters have no GGUF form here; merge them instead")
    pairs: dict[str, dict] = {}
    for name, tensor in peft_model.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.default.weight"
            if name.endswith(marker):
                hf = name[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(hf, {})[part] = tensor.detach().to(torch.float32).cpu()
    if not pairs:
        raise ValueError("the model has no LoRA weights")
    path = Path(path)
    tensors = {}  # every pair is mapped before the file is opened
    for hf, ab in sorted(pairs.items()):
        target = names.get_name(hf, try_suffixes=(".weight",))
        if target is None or set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"cannot map LoRA weights of {hf!r} to a GGUF tensor")
        b = ab["lora_B"]
        if arch == gguf.MODEL_ARCH.LLAMA and target.endswith("attn_q.weight"):
            b = _rotate_half_to_interleaved(b, config.num_attention_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and target.endswith("attn_k.weight"):
            b = _rotate_half_to_interleaved(b, config.num_key_value_heads)
        tensors[target + ".lora_a"] = np.ascontiguousarray(ab["lora_A"].numpy())
        tensors[target + ".lora_b"] = np.ascontiguousarray(b.numpy())
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(peft_cfg.lora_alpha))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    write_file(writer, path)
    return len(pairs)
