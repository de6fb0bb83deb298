"""CTranslate2 Whisper encoder loading and packaged weights: parity with transformers and with ctranslate2."""
import numpy as np
import pytest

import tiny
from ct2_writer import ct2_encoder_variables, write_ct2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llasm.runtime.features import log_mel  # noqa: E402
from llasm.training import packaged  # noqa: E402
from llasm.training.base import BaseModelError, load_whisper  # noqa: E402
from llasm.training.ct2 import load_ct2_whisper_encoder, read_ct2  # noqa: E402


@pytest.fixture(scope="module")
def hf_whisper():
    """A tiny random transformers Whisper: every encoder weight perturbed (norms too, so swaps show) and
    rounded to fp16; layer 1's ffn norm gain equals layer 0's, so the file can store it as an alias."""
    torch.manual_seed(0)
    cfg = tiny.whisper_config()
    model = transformers.WhisperModel(cfg).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2).copy_(p.half().float())
        model.encoder.layers[1].final_layer_norm.weight.copy_(model.encoder.layers[0].final_layer_norm.weight)
    return model, cfg


@pytest.fixture(scope="module")
def ct2_dir(hf_whisper, tmp_path_factory):
    model, cfg = hf_whisper
    variables = ct2_encoder_variables(model.encoder, cfg.encoder_attention_heads)
    alias = "encoder/layer_1/ffn/layer_norm/gamma"
    del variables[alias]
    variables["decoder/embeddings/weight"] = np.ones((4, cfg.d_model), np.float16)  # unrelated, ignored
    out = tmp_path_factory.mktemp("ct2")
    write_ct2(out / "model.bin", variables, aliases={alias: "encoder/layer_0/ffn/layer_norm/gamma"})
    return out


def test_ct2_encoder_matches_transformers(hf_whisper, ct2_dir):
    model, cfg = hf_whisper
    encoder = load_ct2_whisper_encoder(ct2_dir)
    assert (encoder.cfg.n_mels, encoder.cfg.d_model, encoder.cfg.n_layers, encoder.cfg.n_heads,
            encoder.cfg.ffn_dim) == (80, cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads,
                                     cfg.encoder_ffn_dim)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.encoder(mel).last_hidden_state
        ours = encoder(mel)
    assert ours.shape == ref.shape == (1, 1500, cfg.d_model)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_load_whisper_takes_ct2_dir_and_file(ct2_dir):
    a, b = load_whisper(str(ct2_dir)), load_whisper(str(ct2_dir / "model.bin"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(BaseModelError, match="no Whisper model"):
        load_whisper(str(ct2_dir / "nothing-here"))


def test_int8_weights_are_dequantized(hf_whisper, tmp_path):
    model, cfg = hf_whisper
    variables = ct2_encoder_variables(model.encoder, cfg.encoder_attention_heads, dtype=np.float32)
    for name in [n for n in variables if n.endswith("/weight")]:  # linear (2-D) and conv (3-D) weights
        w = variables[name]
        scale = (127.0 / np.abs(w.reshape(w.shape[0], -1)).max(axis=1)).astype(np.float32)  # per output row
        variables[name] = np.rint(w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int8)
        variables[name + "_scale"] = scale
    write_ct2(tmp_path / "model.bin", variables)
    ours = load_ct2_whisper_encoder(tmp_path).state_dict()
    ref = model.encoder.state_dict()
    for name in ("conv1.weight", "layers.0.self_attn.k_proj.weight", "layers.1.fc2.weight"):
        step = ref[name].abs().flatten(1).amax(1) / 127  # one int8 step per output row
        err = (ours[name] - ref[name]).abs().flatten(1).amax(1)
        assert torch.all(err <= step * 0.51), name


def test_read_ct2_rejects_truncated_and_foreign_files(ct2_dir, tmp_path):
    data = (ct2_dir / "model.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2(tmp_path / "short.bin")
    (tmp_path / "foreign.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="binary version"):
        read_ct2(tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="expected 'OtherSpec'"):
        read_ct2(ct2_dir / "model.bin", spec="OtherSpec")


def test_tiny_en_package_matches_ctranslate2():
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 not installed (pip install ctranslate2)")
    try:
        model_dir = packaged.whisper_tiny_en_dir()
    except packaged.MissingPackageError as e:
        pytest.skip(str(e))
    mel = log_mel(tiny.speech(30))  # (80, 3000)
    assert mel.shape == (80, 3000)
    encoder = load_whisper("package:whisper-tiny.en")
    with torch.no_grad():
        ours = encoder(torch.from_numpy(mel)[None]).numpy()
    ct2 = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    ref = np.array(ct2.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True))
    assert ours.shape == ref.shape == (1, 1500, 384)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel  # 3e-6 measured: fp16 weights widened the same way, float32 compute on both sides


def test_resolve_rejects_unknown_specs():
    with pytest.raises(ValueError, match="package:whisper-base"):
        packaged.resolve("package:whisper-huge")
    with pytest.raises(ValueError, match="not a package spec"):
        packaged.resolve("whisper-base")
    with pytest.raises(BaseModelError, match="unknown packaged model"):
        load_whisper("package:nope")


def test_missing_package_names_the_pip_command():
    missing = packaged.PackageFile("llasm-no-such-package", "1.2.3", "x/model.bin")
    with pytest.raises(packaged.MissingPackageError, match=r"pip install 'llasm-no-such-package==1\.2\.3'"):
        missing.locate()


def test_concatenate_checks_size_and_leaves_no_partial_file(tmp_path):
    parts = []
    for i, payload in enumerate([b"GGUF", b"0123456789", b"tail"]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(payload)
    dest = tmp_path / "cache" / "joined.gguf"
    with pytest.raises(ValueError, match="add up to 18 bytes, expected 19"):
        packaged.concatenate(parts, dest, 19, progress=False)
    assert packaged.concatenate(parts, dest, 18, progress=False).read_bytes() == b"GGUF0123456789tail"
    assert [p.name for p in dest.parent.iterdir()] == ["joined.gguf"]
