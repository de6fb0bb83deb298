"""The commands as a user runs them: one-line errors, exit codes, JSON output; runtime stays torch-free."""
import json
import subprocess
import sys

import pytest

import tiny


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, input=stdin, timeout=300)


def _one_line_error(r, prog):
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_runtime_imports_no_torch():
    code = ("import sys, llasm; from llasm import LLaSM; import llasm.runtime.chat, llasm.runtime.bundle, "
            "llasm.runtime.features, llasm.runtime.encoder, llasm.runtime.llm, llasm.cli.local; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_bundle(tmp_path):
    r = run("llasm.cli.local", "--bundle", str(tmp_path / "nope"), "--text", "hi")
    assert "bundle not found" in _one_line_error(r, "llasm-local")


def test_missing_and_broken_audio(bundle, tmp_path):
    r = run("llasm.cli.local", "--bundle", str(bundle), "--audio", str(tmp_path / "missing.wav"))
    assert "audio file not found" in _one_line_error(r, "llasm-local")
    r = run("llasm.cli.local", "--bundle", str(bundle), "--audio", str(tmp_path))
    assert "is a directory, not an audio file" in _one_line_error(r, "llasm-local")
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio")
    r = run("llasm.cli.local", "--bundle", str(bundle), "--audio", str(bad))
    assert "cannot read audio" in _one_line_error(r, "llasm-local")


def test_json_turn(bundle, tmp_path):
    import soundfile as sf

    wav = tmp_path / "q.wav"
    sf.write(wav, tiny.speech(1.0), 16000)
    r = run("llasm.cli.local", "--bundle", str(bundle), "--audio", str(wav), "--text", "answer",
            "--json", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "heard", "audio_seconds", "timings_ms", "tokens", "tokens_per_s"}
    assert out["tokens"] == 4 and abs(out["audio_seconds"] - 1.0) < 1e-6
    assert out["heard"] is None  # a stack-mlp adaptor hears no words
    assert set(out["timings_ms"]) == {"features", "encode", "prefill", "first_token", "total"}


def test_interactive_session_survives_a_broken_file(bundle, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    script = f"hello\n/audio {bad}\n/reset\n/help\nsecond question\n/quit\n"
    r = run("llasm.cli.local", "--bundle", str(bundle), "--max-tokens", "3", "--json", stdin=script)
    assert r.returncode == 0, r.stderr
    replies = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(replies) == 2  # the broken file did not end the session
    assert "error: cannot read audio" in r.stderr and "/reset" in r.stderr


def test_export_refuses_a_non_checkpoint(tmp_path):
    pytest.importorskip("torch")
    r = run("llasm.cli.export", str(tmp_path), "-o", str(tmp_path / "b"))
    assert "not a checkpoint" in _one_line_error(r, "llasm-export")
    assert not (tmp_path / "b").exists()


def test_train_rejects_unknown_preset_field(tmp_path):
    pytest.importorskip("torch")
    preset = tmp_path / "p.toml"
    preset.write_text('stage = 1\ndata = "x.jsonl"\nout = "o"\nwhisper = "w"\nllm = "l"\nlearning_rate = 1\n')
    r = run("llasm.cli.train", str(preset))
    assert "unknown preset fields ['learning_rate']" in _one_line_error(r, "llasm-train")


def test_whisper_lora_refuses_bad_input_in_one_line(whisper_ct2, tmp_path):
    pytest.importorskip("torch")
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "hello"}\n')
    base = ["whisper-lora", "--train", str(manifest), "--dev", str(manifest), "-o", str(tmp_path / "l.npz")]
    r = run("llasm.cli.train", *base, "--set", "rank=4", "--set", "depth=2")
    assert "unknown settings ['depth']" in _one_line_error(r, "llasm-train")
    r = run("llasm.cli.train", *base, "--whisper", str(whisper_ct2))
    assert "has no tokenizer.json" in _one_line_error(r, "llasm-train")
    r = run("llasm.cli.train", *base[:2], str(tmp_path / "missing.jsonl"), *base[3:], "--whisper", str(whisper_ct2))
    assert f"cannot read the manifest {tmp_path / 'missing.jsonl'}: No such file" in _one_line_error(r, "llasm-train")
    assert not (tmp_path / "l.npz").exists()


def test_train_cli_runs_a_shipped_preset(tiny_bases, speech_data, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "smoke"
    r = run("llasm.cli.train", "tiny-smoke", "-q", "--set", f"whisper={tiny_bases['whisper']}",
            "--set", f"llm={tiny_bases['llm']}", "--set", f"data={speech_data / 'asr.jsonl'}", "--set", f"out={out}")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["step"] == 2 and config["llm_mode"] == "frozen"


def test_shipped_presets_are_valid_configs():
    pytest.importorskip("torch")
    import tomllib
    from pathlib import Path

    from llasm.training.trainer import TrainConfig

    presets = sorted((Path(__file__).parent.parent / "training" / "presets").glob("*.toml"))
    assert {p.stem for p in presets} >= {"default-stage1", "default-stage2", "tiny-smoke"}
    for p in presets:
        values = tomllib.loads(p.read_text())
        values.update({k: "x" for k in ("whisper", "llm", "data") if not values.get(k)})
        TrainConfig(**values)  # raises on an unknown field or a bad value


def test_data_answers_come_from_a_gguf(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    import argparse

    from llasm.cli.data import _answerer
    from llasm.export.gguf import write_gguf

    tok = tiny.tokenizer()
    write_gguf(tiny.lm("qwen2", len(tok)), tok, tmp_path / "m.gguf", dtype="f32")
    answer, (many, size) = _answerer(argparse.Namespace(llm=str(tmp_path / "m.gguf"), threads=1,
                                                        max_answer_tokens=4))
    questions = ["What is the capital of France?", "Name a colour.", "今天天气怎么样？"]
    a, b = answer(questions[0]), answer(questions[0])
    assert isinstance(a, str) and a == b  # greedy: the same question gets the same answer
    assert size >= len(questions) and many(questions) == [answer(q) for q in questions]


def test_no_default_model_is_one_clear_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import llasm.export.default as default
    from llasm.cli import local

    monkeypatch.setattr(default, "RELEASE", tmp_path / "no-release")  # an llasm that ships no release checkpoint
    monkeypatch.setenv("LLASM_BUNDLE", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as e:
        local.main(["--text", "hi"])
    r = subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err)
    assert "no default model ships" in _one_line_error(r, "llasm-local")


def test_library_bookkeeping_is_shown_only_with_verbose():
    import logging

    from llasm.cli.common import setup_logging

    gguf_log = logging.getLogger("gguf")  # "Writing the following files:" on every GGUF written
    try:
        setup_logging()
        assert not gguf_log.isEnabledFor(logging.INFO) and gguf_log.isEnabledFor(logging.WARNING)
        setup_logging(verbose=True)
        assert gguf_log.isEnabledFor(logging.DEBUG)
    finally:
        gguf_log.setLevel(logging.NOTSET)


def test_data_build_passes_heldout_only_to_the_build(tmp_path, monkeypatch):
    import llasm.training.speech_data as speech_data
    from llasm.cli.data import main

    seen = []
    monkeypatch.setattr(speech_data, "build", lambda config, **kw: seen.append(config) or speech_data.BuildSummary(
        config.out))
    for argv in ([], ["--heldout-only"]):
        main(["build", str(tmp_path / "d"), "--langs", "en", "-q", *argv])
    assert [c.heldout_only for c in seen] == [False, True]
