"""Export options and bad input: quantized bundles run; a broken checkpoint leaves no partial bundle."""
import json
import shutil
from pathlib import Path

import numpy as np

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import tiny  # noqa: E402
from llasm.export.bundle import export_bundle  # noqa: E402
from llasm.runtime.chat import LLaSM  # noqa: E402


@pytest.mark.parametrize("onnx_precision,gguf_type", [("int8", "q8_0"), ("fp16", "f16"), ("fp32", "q4_k_m")])
def test_precisions_export_and_run(checkpoint, tmp_path, onnx_precision, gguf_type):
    out = tmp_path / "q"
    report = export_bundle(checkpoint, out, onnx_precision=onnx_precision, gguf_type=gguf_type)
    if onnx_precision != "fp32":
        assert report.checks[f"onnx_{onnx_precision}_min_cosine"] >= 0.99
    assert report.checks["llm_kl"] >= 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["llm"]["type"] == gguf_type
    assert manifest["files"]["audio_encoder"]["precision"] == onnx_precision
    assert sorted(p.name for p in out.iterdir()) == ["audio_encoder.onnx", "llm.gguf", "manifest.json"]
    if onnx_precision == "int8":  # the encoder's matrices are quantized, the adaptor's stay fp32
        import onnx

        ops = {n.name: n.op_type for n in onnx.load(str(out / "audio_encoder.onnx")).graph.node}
        assert any(op == "MatMulInteger" and name.startswith("/encoder/") for name, op in ops.items())
        assert ops["/adaptor/out/MatMul"] == "MatMul"
    model = LLaSM.load(out)
    assert model.chat().send(audio=tiny.speech(0.9), max_tokens=3).tokens == 3
    model.close()


def _broken_copy(checkpoint, tmp_path, edit):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    edit(copy)
    return copy


@pytest.mark.parametrize("case,match", [
    ("adaptor_shape", "do not fit the config"),
    ("missing_base", "no LLM at"),
    ("not_a_checkpoint", "not a checkpoint"),
])
def test_bad_checkpoint_leaves_nothing(checkpoint, tmp_path, case, match):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        if case == "adaptor_shape":
            cfg["model"]["adaptor"]["stack_factor"] = 5
        elif case == "missing_base":
            cfg["base"]["llm"] = str(tmp_path / "gone")
        else:
            (d / "config.json").unlink()
            return
        (d / "config.json").write_text(json.dumps(cfg))

    bad = _broken_copy(checkpoint, tmp_path, edit)
    out = tmp_path / "bundle"
    with pytest.raises(ValueError, match=match):
        export_bundle(bad, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


def test_existing_bundle_is_not_overwritten_without_asking(bundle, checkpoint):
    with pytest.raises(FileExistsError):
        export_bundle(checkpoint, bundle)


@pytest.fixture(scope="module")
def gguf_base_checkpoints(tiny_bases, speech_data, tmp_path_factory):
    """Stage 1 and stage 2 (LoRA) checkpoints trained on a GGUF base LLM (the tiny model written as f32 GGUF)."""
    from llasm.export.gguf import write_gguf
    from llasm.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("ggufbase")
    tok = tiny.tokenizer()
    write_gguf(tiny.lm("qwen2", len(tok)), tok, root / "base.gguf", dtype="f32")
    s1 = train(TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(root / "s1"), steps=2, batch_size=2,
                           whisper=tiny_bases["whisper"], llm=str(root / "base.gguf"), lr=1e-2, warmup=1))
    s2 = train(TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(root / "s2"),
                           steps=2, batch_size=2, lr=1e-2, warmup=1, lora_rank=4))
    return root / "base.gguf", s1, s2


def test_gguf_base_ships_untouched_with_a_lora_adapter(gguf_base_checkpoints, tmp_path):
    base, s1, s2 = gguf_base_checkpoints
    frozen = export_bundle(s1, tmp_path / "frozen")  # auto -> base: the LLM file is the base file
    assert (tmp_path / "frozen" / "llm.gguf").read_bytes() == base.read_bytes()
    assert not (tmp_path / "frozen" / "llm.lora.gguf").exists()
    assert frozen.checks["llm_max_logit_diff"] < 1e-3

    report = export_bundle(s2, tmp_path / "lora")
    assert (tmp_path / "lora" / "llm.gguf").read_bytes() == base.read_bytes()
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert manifest["files"]["llm_lora"]["path"] == "llm.lora.gguf"
    # llama.cpp base + adapter == torch with the LoRA merged
    assert report.checks["llm_max_logit_diff"] < 1e-3
    model = LLaSM.load(tmp_path / "lora")
    assert model.chat().send(text="hi", max_tokens=2).tokens == 2
    model.close()


def test_lora_adapter_changes_the_answer_logits(gguf_base_checkpoints, tmp_path):
    """Without the adapter the same prompt gives other logits: the adapter is really applied."""
    from llasm.runtime.llm import LLM

    base, _, s2 = gguf_base_checkpoints
    export_bundle(s2, tmp_path / "b")
    with_lora = LLM(tmp_path / "b" / "llm.gguf", n_ctx=128, lora_path=tmp_path / "b" / "llm.lora.gguf")
    plain = LLM(tmp_path / "b" / "llm.gguf", n_ctx=128)
    for llm in (with_lora, plain):
        llm.eval_tokens(llm.tokenize("<|im_start|>user\nhello world<|im_end|>\n"))
    assert np.abs(with_lora.logits() - plain.logits()).max() > 1e-3
    with_lora.close()
    plain.close()


def test_default_bundle_is_built_once_on_first_use_and_again_for_a_new_release(checkpoint, tmp_path, monkeypatch,
                                                                                capsys):
    import llasm.export.default as default
    from llasm.cli import local

    monkeypatch.setattr(default, "RELEASE", checkpoint)
    monkeypatch.setenv("LLASM_BUNDLE", str(tmp_path / "cache" / "default"))
    path = default.ensure_default_bundle()
    assert path == tmp_path / "cache" / "default" and (path / "manifest.json").is_file()
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert default.ensure_default_bundle() == path and (path / "manifest.json").stat().st_mtime_ns == stamp
    # llasm-local with no --bundle uses it
    local.main(["--text", "hi", "--max-tokens", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 2
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    # a newer release checkpoint (another step of the run) replaces the cached bundle
    newer = tmp_path / "newer"
    shutil.copytree(checkpoint, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["train"]["step"] += 1
    (newer / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(default, "RELEASE", newer)
    assert default.stale_release(path)
    assert default.ensure_default_bundle() == path and not default.stale_release(path)
    assert (path / "manifest.json").stat().st_mtime_ns != stamp


def test_the_api_builds_the_default_bundle_on_first_use(checkpoint, tmp_path, monkeypatch):
    import llasm.export.default as default
    from llasm import LLaSM

    monkeypatch.setattr(default, "RELEASE", checkpoint)
    monkeypatch.setenv("LLASM_BUNDLE", str(tmp_path / "cache" / "default"))
    model = LLaSM.load()  # no bundle named, none built yet
    assert model.bundle.path == tmp_path / "cache" / "default"
    assert model.chat().send(text="hi", max_tokens=2).tokens == 2
    model.close()
    (tmp_path / "cache" / "default" / "manifest.json").write_text("{")  # broken, e.g. by a crash of another tool
    model = LLaSM.load()  # rebuilt, not refused
    assert model.chat().send(text="hi", max_tokens=2).tokens == 2
    model.close()


def test_without_the_build_extras_the_default_bundle_is_one_clear_error(checkpoint, bundle, tmp_path, monkeypatch,
                                                                         caplog):
    import importlib.util

    import llasm.export.default as default
    from llasm.runtime.bundle import BundleError

    monkeypatch.setattr(default, "RELEASE", checkpoint)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    monkeypatch.setenv("LLASM_BUNDLE", str(tmp_path / "none"))
    with pytest.raises(BundleError, match="built on first use and that needs torch: pip install"):
        default.ensure_default_bundle()
    assert not (tmp_path / "none").exists()
    earlier = tmp_path / "earlier"  # a bundle built from an earlier release: still used, with a warning
    shutil.copytree(bundle, earlier)
    manifest = json.loads((earlier / "manifest.json").read_text())
    manifest["provenance"].update(release=default.RELEASE_NAME, train_step=-1)
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("LLASM_BUNDLE", str(earlier))
    assert default.stale_release(earlier)
    assert default.ensure_default_bundle() == earlier and "'llasm[export,base]' (torch is missing)" in caplog.text


def test_a_bundle_of_the_users_own_is_never_replaced_by_the_release(checkpoint, bundle, tmp_path, monkeypatch,
                                                                   capsys):
    import llasm.export.default as default
    from llasm.cli import local

    monkeypatch.setattr(default, "RELEASE", checkpoint)
    monkeypatch.setenv("LLASM_BUNDLE", str(bundle))  # built by llasm-export, not from a release
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert not default.stale_release(bundle)
    assert default.ensure_default_bundle() == bundle
    local.main(["--text", "hi", "--max-tokens", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 2
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp


def test_bundle_directory_is_readable_by_others(bundle):
    assert (bundle.stat().st_mode & 0o777) == 0o755


def test_every_file_of_the_release_checkpoint_is_package_data():
    """A wheel (not only an editable install) must carry the whole release, LoRA subdirectory included."""
    import tomllib

    from llasm.export import default

    root = Path(default.__file__).resolve().parent
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["llasm.export"]
    shipped = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    release = {p for p in default.RELEASE.rglob("*") if p.is_file()}
    assert release and release <= shipped, sorted(str(p.relative_to(root)) for p in release - shipped)
