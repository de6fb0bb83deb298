"""The whole chain on tiny models: checkpoint -> bundle -> runtime, with parity at every joint."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import tiny  # noqa: E402
from llasm.runtime.bundle import BundleError, read_bundle  # noqa: E402
from llasm.runtime.chat import LLaSM  # noqa: E402
from llasm.runtime.encoder import AudioEncoder  # noqa: E402
from llasm.runtime.features import log_mel  # noqa: E402
from llasm.runtime.llm import LLM  # noqa: E402
from llasm.runtime.prompt import Turn  # noqa: E402
from llasm.training.checkpoint import load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint, merge_lora=True)
    return model.float().eval(), tok


def test_manifest_describes_the_bundle(bundle):
    b = read_bundle(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "llasm-bundle" and manifest["n_embd"] == b.n_embd == 64
    assert b.geometry.stack_factor == 2 and b.prompt.generation_prompt == "<|im_start|>assistant\n"
    for entry in manifest["files"].values():
        assert (bundle / entry["path"]).stat().st_size == entry["size"]


def test_onnx_rows_match_torch_adaptor(bundle, torch_model):
    model, _ = torch_model
    b = read_bundle(bundle)
    enc = AudioEncoder(b.audio_encoder, b.geometry)
    x = tiny.speech(1.7, seed=5)
    got = enc(x)
    with torch.no_grad():
        mel = torch.from_numpy(log_mel(x))[None]
        want = model.audio_rows(mel, torch.tensor([mel.shape[-1]]))[0].numpy()
    assert got.shape == want.shape == (b.geometry.n_embeddings(x.size), 64)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_long_audio_is_split_into_encoder_windows(bundle):
    b = read_bundle(bundle)
    enc = AudioEncoder(b.audio_encoder, b.geometry)
    x = np.tile(tiny.speech(1.0), 31)  # 31 s: two chunks
    rows = enc(x)
    assert rows.shape[0] == b.geometry.n_embeddings(x.size) == sum(
        b.geometry.n_rows_for_frames(b.geometry.n_frames(e - s)) for s, e in b.geometry.chunks(x.size))
    assert len(b.geometry.chunks(x.size)) == 2


def _torch_inputs(model, tok, segments, rows):
    parts = []
    for seg in segments:
        if seg.is_audio:
            parts.append(torch.from_numpy(rows))
        else:
            with torch.no_grad():
                parts.append(model.embed_tokens(torch.tensor(tok(seg.text, add_special_tokens=False)["input_ids"])))
    return torch.cat(parts)[None]


def test_llama_cpp_logits_match_torch_on_interleaved_audio_and_text(bundle, torch_model):
    model, tok = torch_model
    b = read_bundle(bundle)
    x = tiny.speech(1.2, seed=7)
    rows = AudioEncoder(b.audio_encoder, b.geometry)(x)
    segments = b.prompt.render([Turn("user", ("Listen:", x, "What did you hear?"))])
    assert sum(s.is_audio for s in segments) == 1 and len(segments) == 3
    llm = LLM(b.llm, n_ctx=512, n_batch=16)  # n_batch 16: audio and text both span several batches
    for seg in segments:
        if seg.is_audio:
            llm.eval_embeddings(rows)
        else:
            llm.eval_tokens(llm.tokenize(seg.text))
    got = llm.logits()
    want = model.logits(_torch_inputs(model, tok, segments, rows))[0, -1].numpy()
    assert int(got.argmax()) == int(want.argmax())
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    llm.close()


def test_embedding_path_equals_token_path(bundle, torch_model):
    model, tok = torch_model
    b = read_bundle(bundle)
    ids = tok("<|im_start|>user\nhello world<|im_end|>\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        rows = model.embed_tokens(torch.tensor(ids)).numpy()
    a = LLM(b.llm, n_ctx=256)
    a.eval_tokens(ids)
    by_token = a.logits()
    a.truncate(0)
    a.eval_embeddings(rows)
    by_embedding = a.logits()
    a.close()
    np.testing.assert_allclose(by_embedding, by_token, atol=1e-4)


def test_chat_kept_kv_equals_full_recompute(bundle):
    model = LLaSM.load(bundle, n_ctx=1024)
    chat = model.chat()
    r1 = chat.send(audio=tiny.speech(0.8, seed=1), text="first", max_tokens=5)
    r2 = chat.send(audio=tiny.speech(1.1, seed=2), max_tokens=5)
    assert r1.tokens == 5 and set(r2.timings) == {"features", "encode", "prefill", "first_token", "total"}
    # The same history computed from nothing in a fresh context gives the same next-token logits.
    fresh = LLM(read_bundle(bundle).llm, n_ctx=1024)
    assert model.kv.holds(chat.history())
    for f in chat.history():
        (fresh.eval_embeddings if isinstance(f, np.ndarray) else fresh.eval_tokens)(f)
    np.testing.assert_allclose(model.llm.logits(), fresh.logits(), atol=1e-4)
    fresh.close()
    model.close()


def test_failed_turn_leaves_the_conversation_as_it_was(bundle, tmp_path):
    model = LLaSM.load(bundle)
    chat = model.chat()
    chat.send(text="hello", max_tokens=3)
    before = (list(chat.turns), model.llm.n_past)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    for audio in (bad, tmp_path / "missing.wav", np.zeros(16000, np.float32)):
        with pytest.raises(ValueError):
            chat.send(audio=audio)
        assert (list(chat.turns), model.llm.n_past) == before
    assert chat.send(text="again", max_tokens=2).tokens == 2
    model.close()


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "llm.gguf", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(copy)


def test_width_mismatch_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["n_embd"] = 896
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle needs n_embd 896, audio encoder gives 64"):
        LLaSM.load(copy)
