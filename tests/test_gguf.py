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
# f16 weights and llama.cpp's default f16 KV cache: observed ~1e-3; near-ties may flip (qwen2: 1 of 87 positions).
F16_REL_TOL = 2e-2
F16_MIN_TOP1 = 0.95

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


def run(model, tok, ids, path, *, dtype, f32_kv):
    """Export, load in llama.cpp, evaluate `ids`; returns (torch logits, llama.cpp logits, Llama), logits (T, V)."""
    write_gguf(model, tok, path, dtype=dtype)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, **kv)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return ref, got, llm


def report(ref, got):
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"max|diff|/max|logit| {rel:.2e}, top-1 agreement {top1:.3f}")
    return rel, top1


@pytest.mark.parametrize("arch, config", [
    ("qwen2", {}), ("llama", {}), ("gemma3", {}),
    ("qwen2", {"tied": False}), ("llama", {"tied": False}), ("gemma3", {"tied": False}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("gemma3", {"rope_parameters": GEMMA3_ROPE}),
], ids=["qwen2", "llama", "gemma3", "qwen2-untied", "llama-untied", "gemma3-untied", "llama-llama3rope",
        "gemma3-localrope"])
def test_f32_logits_match_torch(tok, chat_ids, tmp_path, arch, config):
    ref, got, _ = run(lm(arch, len(tok), **config), tok, chat_ids, tmp_path / "m.gguf", dtype="f32", f32_kv=True)
    rel, top1 = report(ref, got)
    assert top1 == 1.0
    assert rel < F32_REL_TOL[arch]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_f16_logits_match_torch(tok, chat_ids, tmp_path, arch):
    ref, got, _ = run(lm(arch, len(tok)), tok, chat_ids, tmp_path / "m.gguf", dtype="f16", f32_kv=False)
    rel, top1 = report(ref, got)
    assert top1 >= F16_MIN_TOP1
    assert rel < F16_REL_TOL


def qwen2_style(tok):
    """The tiny tokenizer with Qwen2's pre-tokenizer: Split(regex) then ByteLevel without its own regex."""
    from tokenizers import Regex, pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("pre", ["gpt-2", "qwen2"])
def test_tokenizer_matches_hf(tmp_path, arch, pre):
    tok = tiny.tokenizer() if pre == "gpt-2" else qwen2_style(tiny.tokenizer())
    write_gguf(lm(arch, len(tok)), tok, tmp_path / "m.gguf", dtype="f16")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text

    meta = llm.metadata
    assert meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.chat_template"] == tiny.CHATML
    assert meta["tokenizer.ggml.add_bos_token"] == "false"
    assert "tokenizer.ggml.bos_token_id" not in meta
    assert llm.token_eos() == tok.eos_token_id
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert llama_cpp.llama_vocab_eot(vocab) == im_end
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert not llama_cpp.llama_vocab_is_eog(vocab, tok.convert_tokens_to_ids("<|im_start|>"))


def test_chat_template_argument_overrides_tokenizer(tok, tmp_path):
    write_gguf(lm("qwen2", len(tok)), tok, tmp_path / "m.gguf", dtype="f16", chat_template="{{ messages }}")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == "{{ messages }}"


def test_bad_dtype(tok, tmp_path):
    with pytest.raises(ValueError, match="allowed: f32, f16"):
        write_gguf(lm("qwen2", len(tok)), tok, tmp_path / "m.gguf", dtype="q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture(tok, tmp_path):
    cfg = transformers.MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported architecture mistral; supported: qwen2, llama, gemma3"):
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_pre_tokenizer(tmp_path):
    from tokenizers import pre_tokenizers

    tok = tiny.tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="Whitespace"):
        write_gguf(lm("qwen2", len(tok)), tok, tmp_path / "m.gguf")


def test_gemma3_attention_scale_llama_cpp_cannot_express(tok, tmp_path):
    with pytest.raises(ValueError, match="query_pre_attn_scalar 32"):
        write_gguf(lm("gemma3", len(tok), query_pre_attn_scalar=32), tok, tmp_path / "m.gguf")


def test_failed_write_removes_partial_file(tok, tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(lm("qwen2", len(tok)), tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
