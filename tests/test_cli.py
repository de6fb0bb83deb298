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
    assert set(out) == {"text", "audio_seconds", "timings_ms", "tokens", "tokens_per_s"}
    assert out["tokens"] == 4 and abs(out["audio_seconds"] - 1.0) < 1e-6
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
