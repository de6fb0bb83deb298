"""Export options and bad input: quantized bundles run; a broken checkpoint leaves no partial bundle."""
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import tiny  # noqa: E402
from llasm.export.bundle import export_bundle  # noqa: E402
from llasm.runtime.chat import LLaSM  # noqa: E402
from llasm.training.checkpoint import CheckpointError  # noqa: E402


def test_int8_encoder_and_q8_llm(checkpoint, tmp_path):
    out = tmp_path / "q"
    report = export_bundle(checkpoint, out, onnx_precision="int8", gguf_type="q8_0")
    assert report.checks["onnx_int8_min_cosine"] >= 0.99
    assert report.checks["llm_kl"] >= 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["llm"]["type"] == "q8_0"
    assert manifest["files"]["audio_encoder"]["precision"] == "int8"
    assert sorted(p.name for p in out.iterdir()) == ["audio_encoder.onnx", "llm.gguf", "manifest.json"]
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
