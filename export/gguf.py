"""Write an in-memory transformers causal LM and its tokenizer as one GGUF file that llama.cpp runs.

The contract, per architecture (checked against llama.cpp's loaders, not just gguf-py's names):

    qwen2   NEOX rope, q/k/v biases, SiLU gate. Weights as in HF.
    llama   NORM rope (adjacent pairs), so q/k rows are permuted from HF's rotate_half layout;
            llama3 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors.
    gemma3  NEOX rope, GELU(tanh) gate, sandwich norms, q/k norms. HF's RMSNorm computes x * (1 + w);
            llama.cpp computes x * w, so every norm weight is stored as 1 + w. llama.cpp derives the
            attention scale from head_dim (n_embd / n_head for the 62-layer 27B), hard-codes every 6th
            layer as global, and reads the local rope base from `rope.freq_base_swa`; configs that
            disagree are refused rather than silently exported.

The tokenizer must be a byte-level BPE (GPT-2 style): llama.cpp re-implements the pre-tokenizer regex
and picks it by name (`tokenizer.ggml.pre`), so only regexes it knows are accepted.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED = {"qwen2": "QWEN2", "llama": "LLAMA", "gemma3_text": "GEMMA3"}  # HF model_type -> gguf.MODEL_ARCH
DTYPES = ("f32", "f16")
GEMMA3_SWA_PATTERN = 6  # llama.cpp: layer i is global iff (i + 1) % 6 == 0
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class Vocab:
    """What llama.cpp needs to tokenize like the HF tokenizer, in id order."""
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", by rank
    pre: str  # llama.cpp pre-tokenizer name
    bos: int | None
    eos: int | None
    eot: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool


def write_gguf(model, tokenizer, path, *, dtype: str = "f16", chat_template: str | None = None,
               name: str = "llasm") -> None:
    """Write `model` (Qwen2/Llama/Gemma3-text causal LM) and `tokenizer` to a GGUF file at `path`.

    dtype "f32" or "f16" applies to matrices; norms and other 1-D tensors stay f32 as llama.cpp expects.
    The chat template defaults to the tokenizer's. A half-written file is removed on error.
    """
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs gguf-py: pip install 'llasm[export]'") from e

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    config = model.config
    if config.model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture {config.model_type}; supported: {', '.join(SUPPORTED)}")
    arch = gguf.MODEL_ARCH[SUPPORTED[config.model_type]]
    template = tokenizer.chat_template if chat_template is None else chat_template
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template must be a str, got {type(template).__name__}")

    # Everything is validated and converted before the file is opened.
    tensors = dict(_tensors(model, arch, np.float16 if dtype == "f16" else np.float32))
    n_vocab = tensors["token_embd.weight"].shape[0]
    vocab = _vocab(tokenizer, n_vocab)

    path = Path(path)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config, arch, n_vocab)
    _add_vocab(writer, vocab)
    if template is not None:
        writer.add_chat_template(template)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    write_file(writer, path)
    logger.info("wrote %s: %s, %d tensors, %d tokens, %s", path, gguf.MODEL_ARCH_NAMES[arch], len(tensors),
                n_vocab, dtype)


# ---------------------------------------------------------------------------------------------- weights

def _tensors(model, arch, matrix_dtype):
    """Yield (gguf name, numpy array) for every weight, in llama.cpp's layout and dtype."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head_dim = _head_dim(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of {config.model_type}")
        w = tensor.detach().to(torch.float32).cpu()
        if arch == gguf.MODEL_ARCH.LLAMA and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _rotate_half_to_interleaved(w, config.num_attention_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _rotate_half_to_interleaved(w, config.num_key_value_heads)
        if arch == gguf.MODEL_ARCH.GEMMA3 and hf_name.endswith("norm.weight"):
            w = w + 1.0  # HF Gemma3RMSNorm: x * (1 + w); llama.cpp: x * w
        array = w.numpy()
        yield gguf_name, array if array.ndim == 1 else array.astype(matrix_dtype)
    if arch == gguf.MODEL_ARCH.LLAMA and _rope(config)["rope_type"] == "llama3":
        theta = _rope(config)["rope_theta"]
        base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
        # llama.cpp divides each rope frequency by its factor; HF stores the already-divided frequencies.
        factors = base / model.model.rotary_emb.inv_freq.detach().float().cpu()
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy()


def write_file(writer, path: Path) -> None:
    """A GGUFWriter's header, metadata and tensors into `path`; a failure removes the partial file."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()


def _rotate_half_to_interleaved(w, n_head: int):
    """Reorder q/k projection rows from HF's rotate_half pairs (i, i + d/2) to llama.cpp's pairs (2i, 2i + 1)."""
    rows = w.shape[0]
    # (n_head * d, ...) -> (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...) -> (n_head * d, ...)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- hparams

def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, layer_type: str | None = None) -> dict:
    """Rope parameters as {"rope_type", "rope_theta", ...}, from transformers 5 or 4.x configs."""
    params = getattr(config, "rope_parameters", None)
    if params is not None:
        params = dict(params[layer_type] if layer_type else params)
    elif layer_type == "sliding_attention":
        params = {"rope_theta": config.rope_local_base_freq}
    else:
        params = {"rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _add_rope(writer, config, arch, layer_type: str | None = None) -> None:
    import gguf

    rope = _rope(config, layer_type)
    allowed = ("default", "linear", "llama3") if arch == gguf.MODEL_ARCH.LLAMA else ("default", "linear")
    if rope["rope_type"] not in allowed:
        raise ValueError(f"rope type {rope['rope_type']!r} of {config.model_type} is not supported; "
                         f"allowed: {', '.join(allowed)}")
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _add_hparams(writer, config, arch, n_vocab: int) -> None:
    import gguf

    head_dim = _head_dim(config)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    if arch != gguf.MODEL_ARCH.GEMMA3:
        if config.hidden_act != "silu":
            raise ValueError(f"{config.model_type} hidden_act {config.hidden_act!r}; llama.cpp expects 'silu'")
        if getattr(config, "use_sliding_window", False):
            raise ValueError(f"{config.model_type} with use_sliding_window=True; llama.cpp's loader has none")
        _add_rope(writer, config, arch)
        return

    # Gemma3: check what llama.cpp hard-codes, then write what it reads.
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"gemma3 hidden_activation {config.hidden_activation!r}; llama.cpp uses 'gelu_pytorch_tanh'")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"gemma3 attn_logit_softcapping {config.attn_logit_softcapping}; llama.cpp expects None")
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"gemma3 final_logit_softcapping {config.final_logit_softcapping}; "
                         "llama.cpp's sliding-window gemma3 graph ignores it, expected None")
    is_27b = config.num_hidden_layers == 62
    scalar_cpp = config.hidden_size // config.num_attention_heads if is_27b else head_dim
    if not math.isclose(config.query_pre_attn_scalar, scalar_cpp):
        raise ValueError(f"gemma3 query_pre_attn_scalar {config.query_pre_attn_scalar}; llama.cpp uses "
                         f"{scalar_cpp} for {config.num_hidden_layers} layers")
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
    layer_types = getattr(config, "layer_types", None) or expected
    if list(layer_types) != expected:
        raise ValueError(f"gemma3 layer_types {layer_types}; llama.cpp assumes every "
                         f"{GEMMA3_SWA_PATTERN}th layer global: {expected}")
    if not config.sliding_window:
        raise ValueError(f"gemma3 sliding_window {config.sliding_window!r}; expected a positive window")
    writer.add_sliding_window(config.sliding_window)
    _add_rope(writer, config, arch, "full_attention")
    local = _rope(config, "sliding_attention")
    if local["rope_type"] != "default":
        raise ValueError(f"gemma3 local rope type {local['rope_type']!r}; llama.cpp expects 'default'")
    writer.add_rope_freq_base_swa(local["rope_theta"])


# ---------------------------------------------------------------------------------------------- tokenizer

def _pre_tokenizer(spec: dict | None) -> str:
    """Name of llama.cpp's pre-tokenizer that matches a tokenizers pre_tokenizer spec (tokenizer.json)."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        if spec.get("add_prefix_space"):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space=True; llama.cpp's 'gpt-2' adds none")
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == QWEN2_REGEX
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "qwen2"
    raise ValueError(f"pre-tokenizer {json.dumps(spec)} has no llama.cpp equivalent; expected ByteLevel "
                     "(use_regex) for 'gpt-2' or Split(Qwen2 regex) + ByteLevel for 'qwen2'")


def _vocab(tokenizer, n_vocab: int) -> Vocab:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ValueError(f"tokenizer is {model.get('type')} with {decoder.get('type')} decoder; "
                         "expected a byte-level BPE (BPE model, ByteLevel decoder)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"tokenizer normalizer {normalizer}; llama.cpp's BPE supports none or NFC")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ValueError(f"tokenizer has ids up to {max(by_id)}, the model's embedding has {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows the tokenizer never produces (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            kind = gguf.TokenType.NORMAL
            if i in added:
                kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Vocab(tokens=tokens, types=[int(t) for t in types], merges=merges, pre=pre, bos=bos, eos=eos,
                 eot=tokenizer.get_vocab().get(END_OF_TURN), pad=tokenizer.pad_token_id,
                 add_bos=bos is not None and ids[:1] == [bos],
                 add_eos=eos is not None and ids[-1:] == [eos])


def _add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, token_id in ((writer.add_bos_token_id, vocab.bos), (writer.add_eos_token_id, vocab.eos),
                          (writer.add_eot_token_id, vocab.eot), (writer.add_pad_token_id, vocab.pad)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
