"""Whisper's decoder taught a voice: a LoRA trained in torch, merged into the graphs without torch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
sf = pytest.importorskip("soundfile")

import tiny  # noqa: E402
from llasm.export.whisper_bundle import quantized_graphs, whisper_tokens, write_graphs  # noqa: E402
from llasm.runtime.audio import AudioGeometry  # noqa: E402
from llasm.runtime.whisper_decode import Transcriber, WhisperVocab  # noqa: E402
from llasm.training.whisper_lora import read_lora, save_lora  # noqa: E402
from llasm.training.whisper_tune import TuneConfig, tune  # noqa: E402

PROMPT = [269, 270, 273, 277]  # the tiny Whisper's <|startoftranscript|>, <|en|>, <|transcribe|>, <|notimestamps|>
END = 268


def test_a_tuned_decoder_transcribes_its_clips_as_taught_in_the_graphs(whisper_ct2, tmp_path):
    sounds = [tiny.speech(1.2, seed=1), 0.1 * np.random.default_rng(2).standard_normal(19_200).astype(np.float32)]
    clips = []
    taught_ids = ([256, 257], [261, 262, 263])  # " hello world", " capital of France"
    for i, (sound, ids) in enumerate(zip(sounds, taught_ids)):
        sf.write(tmp_path / f"clip{i}.wav", sound, 16_000)
        clips.append((str(tmp_path / f"clip{i}.wav"), PROMPT + ids + [END]))
    out = tmp_path / "whisper_lora.npz"
    report = tune(whisper_ct2, clips, clips, out, TuneConfig(rank=8, alpha=16, lr=3e-2, steps=100, batch=2),
                  eval_every=10)
    assert report["dev_loss"] < 0.5 * report["start_dev_loss"]  # the tiny table cannot make sure logits
    pairs, scale, meta = read_lora(out)
    assert meta["step"] == report["step"] and scale == 2.0

    data = whisper_tokens(whisper_ct2)
    vocab = WhisperVocab.from_tokens(data["tokens"], data["suppress"], data["suppress_begin"])
    geometry = AudioGeometry(rows="tokens")
    base = Transcriber(*write_graphs(whisper_ct2, tmp_path)[:2], vocab, geometry, pad_seconds=0.5)
    (tmp_path / "tuned").mkdir()
    graphs = write_graphs(whisper_ct2, tmp_path / "tuned", lora=out)[:2]
    as_shipped = Transcriber(*graphs, vocab, geometry, pad_seconds=0.5)
    tuned = Transcriber(*graphs, vocab, geometry, pad_seconds=0.5, tuned=("en",))
    taught = ["hello world", "capital of France"]
    assert [tuned(s, "en").text for s in sounds] == taught
    assert [base(s, "en").text for s in sounds] != taught
    for s in sounds:  # the gate shut: Whisper as shipped, token for token
        assert as_shipped(s, "en").tokens == base(s, "en").tokens
        assert tuned(s, "zh").tokens == base(s, "zh").tokens  # a language it was not tuned for
    (tmp_path / "int8").mkdir()
    int8 = Transcriber(*quantized_graphs(whisper_ct2, tmp_path / "int8", out), vocab, geometry, pad_seconds=0.5,
                       tuned=("en",))
    assert [int8(s, "en").text for s in sounds] == taught  # the gate survives quantization


def test_a_lora_that_does_not_fit_the_decoder_is_refused(whisper_ct2, tmp_path):
    a, b = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
    for i, pairs in enumerate(({"layers.0.fc1.lora_a": a}, {"layers.0.encoder_attn.k_proj.lora_a": a,
                                                            "layers.0.encoder_attn.k_proj.lora_b": b},
                               {"layers.0.self_attn.q_proj.lora_a": a.T, "layers.0.self_attn.q_proj.lora_b": b})):
        save_lora(tmp_path / f"l{i}.npz", pairs, 0.5, {"rank": 2})
        with pytest.raises(ValueError, match="Whisper LoRA"):
            write_graphs(whisper_ct2, tmp_path, lora=tmp_path / f"l{i}.npz")
    pairs, scale, meta = read_lora(tmp_path / "l2.npz")
    assert scale == 0.5 and meta["rank"] == 2 and pairs["layers.0.self_attn.q_proj.lora_a"].dtype == np.float16
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable Whisper LoRA"):
        read_lora(tmp_path / "bad.npz")


def test_a_release_with_a_whisper_lora_builds_it_into_the_bundle(whisper_ct2, tiny_llm_gguf, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    import json

    from llasm.export.default import build_release
    from llasm.runtime.bundle import read_bundle
    from llasm.runtime.chat import LLaSM

    release = tmp_path / "release"
    release.mkdir()
    config = {"format": "llasm-release", "version": 1,
              "adaptor": {"kind": "whisper-decoder", "rows": "hard", "tuned": ["zh"]},
              "base": {"whisper": str(whisper_ct2), "llm": str(tiny_llm_gguf)}}
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="go together"):  # tuned languages without the LoRA
        build_release(release, tmp_path / "none")
    from llasm.export import whisper_bundle

    probes = []
    agrees = whisper_bundle.int8_agrees
    monkeypatch.setattr(whisper_bundle, "int8_agrees", lambda *a: probes.append(len(a[4])) or agrees(*a))
    rng = np.random.default_rng(0)
    save_lora(release / "whisper_lora.npz", {"layers.1.fc1.lora_a": rng.standard_normal((2, 32)),
                                             "layers.1.fc1.lora_b": rng.standard_normal((64, 2))}, 1.0)
    build_release(release, tmp_path / "bundle")
    manifest = read_bundle(tmp_path / "bundle").manifest
    assert manifest["adaptor"]["tuned"] == ["zh"] and len(manifest["provenance"]["whisper_lora"]) == 64
    assert probes == [2]  # the synthetic clip and the packaged Mandarin sample: the tuned path is checked too
    m = LLaSM.load(tmp_path / "bundle")
    try:
        transcriber = m.encoder.transcriber
        assert transcriber.tuned == {"zh"}
        b = read_bundle(tmp_path / "bundle")
        as_shipped = Transcriber(b.audio_encoder, b.file("text_decoder"), transcriber.vocab, b.geometry,
                                 pad_seconds=0.5)
        x = tiny.speech(1.1, seed=11)
        assert transcriber(x, "en").tokens == as_shipped(x, "en").tokens
        assert transcriber(x, "zh").tokens != as_shipped(x, "zh").tokens
    finally:
        m.close()


def test_tuning_refuses_rows_it_cannot_read_and_empty_splits(tmp_path, monkeypatch):
    from llasm.training import whisper_tune

    class Text:  # the tokenizer's part is not what is tested here
        ids = {"endoftext": 0}

        def __init__(self, _):
            pass

        def prompt(self, lang):
            return [1, 2, 3, 4]

        def text(self, sentence, lang):
            return [5]

    monkeypatch.setattr(whisper_tune, "WhisperText", Text)
    good = tmp_path / "good.jsonl"
    good.write_text('{"audio": "clips/a.wav", "text": "hi", "lang": "en"}\n\n')
    assert whisper_tune.examples([good], tmp_path) == [(str(tmp_path / "clips/a.wav"), [1, 2, 3, 4, 5, 0])]
    for i, row in enumerate(('{"audio": "a.wav", "text": "hi"}', "not json", '["a.wav"]')):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(good.read_text() + row + "\n")
        with pytest.raises(ValueError, match=f"bad{i}.jsonl:3: not an ASR row with audio, text and lang"):
            whisper_tune.examples([bad], tmp_path)
    with pytest.raises(ValueError, match="needs training and dev clips; got 1 and 0"):
        tune(tmp_path, [("a.wav", [1, 2, 3, 4, 5, 0])], [], tmp_path / "l.npz", TuneConfig())
