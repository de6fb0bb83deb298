"""Shared fixtures: tiny base models saved to disk, synthetic speech and manifests (nothing downloaded)."""
import json

import numpy as np
import pytest

import tiny


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    """{'whisper': dir, 'llm': dir} of tiny random transformers models (qwen2 LLM)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    transformers.WhisperModel(tiny.whisper_config()).save_pretrained(root / "whisper")
    tok = tiny.tokenizer()
    tiny.lm("qwen2", len(tok)).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return {"whisper": str(root / "whisper"), "llm": str(root / "llm")}


@pytest.fixture(scope="session")
def speech_data(tmp_path_factory):
    """A directory with a few synthetic clips, an ASR manifest and a conversation manifest."""
    sf = pytest.importorskip("soundfile")
    root = tmp_path_factory.mktemp("data")
    texts = ["hello world", "one two three", "the quick brown fox", "what is the capital of France"]
    asr, conv = [], []
    for i, text in enumerate(texts):
        sf.write(root / f"clip{i}.wav", tiny.speech(0.6 + 0.3 * i, seed=i), 16_000)
        asr.append({"audio": f"clip{i}.wav", "text": text})
        conv.append({"turns": [{"role": "user", "content": [{"audio": f"clip{i}.wav"}, {"text": "Answer briefly."}]},
                               {"role": "assistant", "content": f"You said {text}."}]})
    conv.append({"turns": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris."}]})
    (root / "asr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asr))
    (root / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    return root
