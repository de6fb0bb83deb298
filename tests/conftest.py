"""Shared fixtures: tiny base models saved to disk, synthetic speech and manifests (nothing downloaded)."""
import json

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


@pytest.fixture(scope="session")
def checkpoint(tiny_bases, speech_data, tmp_path_factory):
    """A stage-2 (LoRA) checkpoint of the tiny models."""
    pytest.importorskip("torch")
    from llasm.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("chain")
    s1 = train(TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(root / "s1"), steps=2,
                           batch_size=2, lr=1e-2, warmup=1, stack_factor=2, **tiny_bases))
    return train(TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(root / "s2"),
                             steps=2, batch_size=2, lr=1e-2, warmup=1, lora_rank=4))


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported: fp32 ONNX + f32 GGUF."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from llasm.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = export_bundle(checkpoint, out, onnx_precision="fp32", gguf_type="f32")
    assert report.checks["onnx_fp32_max_abs_diff"] < 1e-4
    return out


@pytest.fixture(scope="session")
def whisper_ct2(tmp_path_factory):
    """A tiny random multilingual Whisper as a CTranslate2 directory (what whisper-decoder bundles are built from)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("whisper")
    tiny.ct2_whisper(out)
    return out


@pytest.fixture(scope="session")
def tiny_llm_gguf(tmp_path_factory):
    """A tiny random qwen2 LLM with the tiny tokenizer and its chat template, as an f32 GGUF."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llasm.export.gguf import write_gguf

    path = tmp_path_factory.mktemp("llm") / "llm.gguf"
    torch.manual_seed(0)
    write_gguf(tiny.lm("qwen2", 384), tiny.tokenizer(), path, dtype="f32")
    return path


@pytest.fixture(scope="session")
def whisper_decoder_bundle(whisper_ct2, tiny_llm_gguf, tmp_path_factory):
    """A whisper-decoder bundle of the tiny Whisper and LLM, built without torch (as the default release is)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from llasm.export.whisper_bundle import build_whisper_bundle

    out = tmp_path_factory.mktemp("bundles") / "wd"
    report = build_whisper_bundle(whisper_ct2, tiny_llm_gguf, out, provenance={"test": True})
    assert set(report.checks) == {"int8", "probe_heard", "probe_lang", "probe_rows"}
    return out
