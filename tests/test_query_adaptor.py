"""The llasm-query adaptor (LLaSM's original: Whisper's decoder over 64 fixed queries): decoder parity with
transformers and from CTranslate2, padded batches, training, small checkpoints, export and chat."""
import json

import numpy as np
import pytest

import tiny
from ct2_writer import ct2_decoder_variables, ct2_encoder_variables, write_ct2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llasm.runtime.audio import AudioGeometry  # noqa: E402
from llasm.training.adaptor import AdaptorConfig, QueryAdaptor, saved_state  # noqa: E402
from llasm.training.base import BaseModelError, load_whisper_decoder  # noqa: E402
from llasm.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llasm.training.data import Collator, read_manifest  # noqa: E402
from llasm.training.trainer import TrainConfig, build_model, set_trainable, train  # noqa: E402
from llasm.training.whisper import WhisperDecoder, decoder_config_from_hf, decoder_state_from_hf  # noqa: E402

SOT = 3  # tiny.whisper_config()'s decoder_start_token_id
FROZEN_KEYS = {"queries", "out.weight", "out.bias", "boundary"}


@pytest.fixture(scope="module")
def hf_whisper():
    """A tiny random transformers Whisper, decoder weights perturbed (norms too, so swaps show) and rounded
    to fp16 (so a CTranslate2 fp16 file holds them exactly)."""
    torch.manual_seed(0)
    model = transformers.WhisperModel(tiny.whisper_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2).copy_(p.half().float())
    return model


def _reference(hf, n_queries: int, frames: torch.Tensor) -> torch.Tensor:
    """transformers' decoder on input_ids = <|startoftranscript|> repeated n_queries times."""
    ids = torch.full((frames.shape[0], n_queries), SOT)
    with torch.no_grad():
        return hf.decoder(input_ids=ids, encoder_hidden_states=frames).last_hidden_state


def _max_rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_decoder_matches_transformers(hf_whisper, tmp_path):
    hf = hf_whisper
    ours = WhisperDecoder(decoder_config_from_hf(hf.config, 64)).eval()
    ours.load_state_dict(decoder_state_from_hf(hf.state_dict(), 64))
    frames = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    want = _reference(hf, 64, frames)
    with torch.no_grad():
        got = ours(hf.decoder.embed_tokens.weight[SOT].expand(2, 64, -1), frames)
    assert got.shape == want.shape == (2, 64, 32)
    assert _max_rel(got, want) < 1e-5, _max_rel(got, want)
    # the same through load_whisper_decoder from a transformers directory, with fewer queries (causal: a prefix)
    hf.save_pretrained(tmp_path / "whisper")
    decoder, queries = load_whisper_decoder(str(tmp_path / "whisper"), n_queries=16)
    assert decoder.embed_positions.weight.shape == (16, 32) and not any(p.requires_grad for p in decoder.parameters())
    assert torch.equal(queries, hf.decoder.embed_tokens.weight[SOT].expand(16, -1))
    with torch.no_grad():
        got16 = decoder(queries.expand(2, -1, -1), frames)
    torch.testing.assert_close(got16, want[:, :16], atol=1e-5, rtol=1e-5)
    with pytest.raises(BaseModelError, match="65 queries, the Whisper decoder has 64 positions"):
        load_whisper_decoder(str(tmp_path / "whisper"), n_queries=65)


def _query_adaptor(hf, n_queries=64, seed=0) -> QueryAdaptor:
    decoder = WhisperDecoder(decoder_config_from_hf(hf.config, n_queries))
    decoder.load_state_dict(decoder_state_from_hf(hf.state_dict(), n_queries))
    queries = hf.decoder.embed_tokens.weight[SOT].detach().expand(n_queries, -1)
    torch.manual_seed(seed)
    return QueryAdaptor(AdaptorConfig(d_encoder=32, d_llm=48, kind="llasm-query", n_queries=n_queries),
                        decoder, queries).eval()


def test_padded_batch_equals_items_alone(hf_whisper):
    adaptor = _query_adaptor(hf_whisper)
    lengths = [7, 40, 23]
    gen = torch.Generator().manual_seed(2)
    frames = torch.randn(3, 40, 32, generator=gen)  # garbage past each end: the mask must hide it
    with torch.no_grad():
        rows = adaptor.rows(frames, torch.tensor(lengths))
        assert torch.equal(adaptor.n_rows(torch.tensor(lengths)), torch.tensor([66, 66, 66]))
        for i, n in enumerate(lengths):
            alone = adaptor(frames[i:i + 1, :n])[0]
            assert rows[i].shape == alone.shape == (66, 48)
            torch.testing.assert_close(rows[i], alone, atol=1e-5, rtol=1e-5)
        unmasked = adaptor(frames)[0]
    assert not torch.allclose(unmasked, rows[0], atol=1e-3)  # the padding would change item 0 if not masked
    torch.testing.assert_close(rows[0][0], adaptor.boundary[0])
    torch.testing.assert_close(rows[0][-1], adaptor.boundary[1])


def test_geometry_fixed_rows():
    geo = AudioGeometry(fixed_rows=64)
    assert [geo.n_rows_for_frames(n) for n in (1, 100, 3000)] == [66, 66, 66]
    assert geo.n_embeddings(16_000) == 66 and geo.n_embeddings(31 * 16_000) == 132
    assert AudioGeometry.from_dict(geo.to_dict()) == geo
    stack = AudioGeometry(stack_factor=4)  # the default path: unchanged numbers
    assert stack.fixed_rows == 0 and [stack.n_rows_for_frames(n) for n in (1, 100, 3000)] == [3, 15, 377]
    with pytest.raises(ValueError, match="fixed_rows must be >= 0"):
        AudioGeometry(fixed_rows=-1)
    with pytest.raises(ValueError, match="train_decoder applies to the llasm-query adaptor only"):
        AdaptorConfig(d_encoder=32, d_llm=48, train_decoder=True)


@pytest.fixture(scope="module")
def ct2_dir(hf_whisper, tmp_path_factory):
    hf = hf_whisper
    variables = ct2_encoder_variables(hf.encoder, 4) | ct2_decoder_variables(hf.decoder, 4)
    out = tmp_path_factory.mktemp("ct2q")
    write_ct2(out / "model.bin", variables)
    return out


@pytest.mark.parametrize("vocab", ["vocabulary.txt", "tokenizer.json"])
def test_ct2_decoder_matches_transformers(hf_whisper, ct2_dir, tmp_path, vocab):
    tokens = [f"<|t{i}|>" for i in range(128)]
    tokens[SOT] = "<|startoftranscript|>"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.bin").symlink_to(ct2_dir / "model.bin")
    if vocab == "vocabulary.txt":
        (model_dir / vocab).write_text("\n".join(tokens) + "\n")
    else:
        added = [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if t.startswith("<|")]
        (model_dir / vocab).write_text(json.dumps({"added_tokens": added, "model": {"vocab": {}}}))
    decoder, queries = load_whisper_decoder(str(model_dir))
    assert decoder.cfg.n_layers == 2 and decoder.cfg.n_heads == 4 and queries.shape == (64, 32)
    torch.testing.assert_close(queries, hf_whisper.decoder.embed_tokens.weight[SOT].expand(64, -1), atol=0, rtol=0)
    frames = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = decoder(queries[None], frames)
    want = _reference(hf_whisper, 64, frames)
    assert _max_rel(got, want) < 1e-5, _max_rel(got, want)


def test_ct2_decoder_needs_the_start_token(ct2_dir):
    with pytest.raises(BaseModelError, match="no <\\|startoftranscript\\|> token id"):
        load_whisper_decoder(str(ct2_dir))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def query_stage1(tiny_bases, speech_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("qckpt") / "stage1"
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(out), steps=2, batch_size=2,
                      lr=1e-2, warmup=1, adaptor="llasm-query", **tiny_bases)
    before, _, _ = build_model(cfg)
    return before, train(cfg)


def test_stage1_trains_only_the_linear_and_boundaries(query_stage1, speech_data):
    from safetensors.torch import load_file

    before, path = query_stage1
    after, tok, config = load_checkpoint(path)
    assert config["model"]["adaptor"]["kind"] == "llasm-query" and len(config["train"]["loss"]) == 2
    assert _changed(_snapshot(before.encoder), _snapshot(after.encoder)) == set()
    assert _changed(_snapshot(before.llm), _snapshot(after.llm)) == set()
    assert _changed(_snapshot(before.adaptor), _snapshot(after.adaptor)) == {"out.weight", "out.bias", "boundary"}
    assert not any(p.requires_grad for p in after.adaptor.decoder.parameters())
    # small: the frozen decoder is not in the checkpoint, it comes back from the base
    stored = load_file(str(path / "adaptor.safetensors"))
    assert set(stored) == FROZEN_KEYS
    assert (path / "adaptor.safetensors").stat().st_size < 4 * sum(v.numel() for v in stored.values()) + 1024
    # and it loads back identical: saved again and reloaded, same weights and same loss
    again, _, _ = load_checkpoint(save_checkpoint(after, path.parent / "again", config["base"]))
    assert _changed(_snapshot(after.adaptor), _snapshot(again.adaptor)) == set()
    geo = after.cfg.geometry
    assert geo.fixed_rows == 64 and geo.n_embeddings(int(0.6 * 16000)) == 66
    batch = Collator(tok, after.cfg.prompt, geo)(read_manifest(speech_data / "asr.jsonl",
                                                               after.cfg.transcribe_instruction)[:3])
    with torch.no_grad():
        assert torch.equal(after(batch), again(batch))
        rows = after.audio_rows(batch.mel, batch.n_frames)
    assert [r.shape for r in rows] == [(66, 64)] * 3


def test_a_trained_decoder_is_saved(tiny_bases, speech_data, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), adaptor="llasm-query",
                      n_queries=8, train_decoder=True, **tiny_bases)
    model, _, base = build_model(cfg)
    set_trainable(model, cfg)
    assert all(p.requires_grad for p in model.adaptor.decoder.parameters())
    with torch.no_grad():
        model.adaptor.decoder.layers[0].fc1.weight.add_(1.0)  # what training would change
    path = save_checkpoint(model, tmp_path / "c", base)
    assert set(load_file(str(path / "adaptor.safetensors"))) == set(saved_state(model.adaptor)) > FROZEN_KEYS
    loaded, _, _ = load_checkpoint(path)
    assert _changed(_snapshot(model.adaptor), _snapshot(loaded.adaptor)) == set()
    assert loaded.cfg.geometry.n_embeddings(16000) == 10


def test_export_gives_66_rows_per_chunk_and_chats(query_stage1, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from llasm.export.bundle import export_bundle
    from llasm.runtime.bundle import read_bundle
    from llasm.runtime.chat import LLaSM
    from llasm.runtime.encoder import AudioEncoder
    from llasm.runtime.features import log_mel

    _, path = query_stage1
    report = export_bundle(path, tmp_path / "bundle", gguf_type="f32")
    assert report.checks["onnx_fp32_max_abs_diff"] < 1e-4
    b = read_bundle(tmp_path / "bundle")
    assert b.geometry.fixed_rows == 64
    enc = AudioEncoder(b.audio_encoder, b.geometry)
    model = load_checkpoint(path)[0].float().eval()
    for seconds, n_rows in ((1.0, 66), (2.5, 66), (31.0, 132)):
        x = np.tile(tiny.speech(1.0), int(seconds) + 1)[: int(seconds * 16000)]
        got = enc(x)
        assert got.shape == (n_rows, 64) and b.geometry.n_embeddings(x.size) == n_rows
    x = tiny.speech(1.7, seed=5)
    with torch.no_grad():
        mel = torch.from_numpy(log_mel(x))[None]
        want = model.audio_rows(mel, torch.tensor([mel.shape[-1]]))[0].numpy()
    np.testing.assert_allclose(enc(x), want, atol=1e-5)
    llasm = LLaSM.load(tmp_path / "bundle")
    reply = llasm.chat().send(audio=tiny.speech(1.0), max_tokens=2)
    assert 1 <= reply.tokens <= 2 and reply.audio_seconds == pytest.approx(1.0)
    llasm.close()
