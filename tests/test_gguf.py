"""GGUF export: llama.cpp must tokenize like the HF tokenizer and give torch's logits at every position."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from llasm.export.gguf import QWEN2_REGEX, write_gguf  # noqa: E402

# Bound on max |llama.cpp - torch| / max |torch| with f32 weights and an f32 KV cache. Observed: qwen2 and llama
# ~5e-7, gemma3 ~4e-4 (ggml's GELU reads an fp16 lookup table). Export mistakes (rope layout, norm offsets,
# rope bases) show up as 1e-1 and more with the sharpened weights below.
F32_REL_TOL = {"qwen2": 1e-4, "llama": 1e-4, "gemma3": 2e-3}
F16_REL_TOL = 2e-2  # f16 weights and llama.cpp's default f16 KV cache

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}

TEXTS = ["<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "a  b   c", "  leading", "trailing   ",
         "\n\n\nx\n \n", "x\t\ty", "12345678 and 3.14159", "你好，世界。今天天气很好。", "don't I'LL we've", "🙂 ok!!",
         "hello world<|endoftext|>", " ", ""]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def chat_ids(tok):
    """A ChatML conversation longer than gemma3's tiny sliding window (64), so the window is exercised."""
    text = tok.apply_chat_template([
        {"role": "user", "content": "What is the capital of France? 你好 123\n\n  x"},
        {"role": "assistant", "content": "Paris. one two three four five six seven eight nine ten eleven"},
    ], tokenize=False)
    ids = tok(text)["input_ids"]
    assert 64 < len(ids) < 256
    return ids


def lm(arch, n_vocab, *, tied=True, **config):
    """A tiny random LM like tiny.lm, with matrices x3: at the default init attention is so flat that a
    missing rope permutation moves the logits by only ~1e-2."""
    cfg = tiny.lm_config(arch, n_vocab)
    cfg.tie_word_embeddings = tied
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if "norm" in name else p.mul_(3.0)
    if not tied:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def logits(model, ids, path, *, dtype, f32_kv):
    """(torch, llama.cpp) logits, each (T, V), for the token ids."""
    write_gguf(model, tiny.tokenizer() if False else _TOK[0], path, dtype=dtype)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, **kv)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return ref, got
