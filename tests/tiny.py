"""Tiny random models and a tiny tokenizer, built in code: tests never download."""
from __future__ import annotations

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A ChatML template written for these tests (Qwen-style: a default system block when none is given).
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny test model.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Transcribe the audio.", "What is the capital of France? Paris.", "hello world, the quick brown fox jumps",
    "You are a helpful assistant.", "one two three four five six seven eight nine ten", "你好，世界。今天天气很好。",
    "Speech goes in as embeddings between text segments.", "user assistant system",
]


def tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer) with ChatML specials, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None)
    hf.chat_template = CHATML
    return hf


def lm_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    """A tiny causal-LM config of a given architecture: qwen2, llama or gemma3."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "qwen2":
        return T.Qwen2Config(**common, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    if arch == "llama":
        return T.LlamaConfig(**common, rope_theta=500_000.0, rms_norm_eps=1e-5)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                  rms_norm_eps=1e-6)
    raise ValueError(f"unknown tiny arch {arch!r}")


def lm(arch: str = "qwen2", vocab_size: int = 384, seed: int = 0, **kw):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(lm_config(arch, vocab_size, **kw))
    with torch.no_grad():  # random norms, so a wrong norm convention shows up in parity tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def whisper_config(n_mels: int = 80, d_model: int = 32, layers: int = 2):
    import transformers as T

    return T.WhisperConfig(num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                           decoder_ffn_dim=2 * d_model, vocab_size=128, max_source_positions=1500,
                           max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None)


def speech(seconds: float = 1.0, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    """Synthetic voiced sound: a few harmonics with a wandering pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def whisper_tokens() -> list[str]:
    """A tiny multilingual Whisper vocabulary in CTranslate2's vocabulary.txt form (byte-level BPE strings): the 256
    byte symbols, a few words, then Whisper's special tokens in Whisper's order (<|endoftext|> first)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    byte_chars, extra = [], 0
    for b in range(256):
        if b in keep:
            byte_chars.append(chr(b))
        else:
            byte_chars.append(chr(256 + extra))
            extra += 1
    sym = dict(zip(range(256), byte_chars))
    words = [" hello", " world", " the", "What", " is", " capital", " of", " France", "?", " Paris", "你", "好"]
    pieces = ["".join(sym[b] for b in w.encode("utf-8")) for w in words]
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>", "<|0.00|>", "<|0.02|>"]
    return byte_chars + pieces + specials


def ct2_whisper(out, seed: int = 0, d_model: int = 32):
    """A tiny random multilingual Whisper as a CTranslate2 directory (model.bin fp16, vocabulary.txt, config.json),
    like the packaged whisper-base; returns the transformers model it was written from."""
    import json
    from pathlib import Path

    import torch
    import transformers as T

    from ct2_writer import ct2_decoder_variables, ct2_encoder_variables, write_ct2

    tokens = whisper_tokens()
    cfg = whisper_config(d_model=d_model)
    cfg.vocab_size = len(tokens)
    torch.manual_seed(seed)
    model = T.WhisperModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1).copy_(p.half().float())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variables = ct2_encoder_variables(model.encoder, cfg.encoder_attention_heads)
    variables.update(ct2_decoder_variables(model.decoder, cfg.decoder_attention_heads))
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"]
    write_ct2(out / "model.bin", variables)
    (out / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [32, 256 + 12]}))
    return model
