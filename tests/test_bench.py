"""llasm-bench on the tiny bundle, one iteration: it runs and reports every figure (no timing assertions)."""
import json
import subprocess
import sys

import pytest

import tiny
from llasm.runtime.llm import FALLBACK_NOTE

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    sf = pytest.importorskip("soundfile")
    path = tmp_path_factory.mktemp("bench") / "speech.wav"
    sf.write(path, tiny.speech(1.5), 16000)
    return path


def _cascade_whisper():
    """The packaged tiny.en CT2 model when faster-whisper and the package are installed, else no cascade."""
    import importlib.util

    if importlib.util.find_spec("faster_whisper") is None:
        return None
    try:
        from llasm.training.packaged import whisper_tiny_en_dir

        return str(whisper_tiny_en_dir())
    except FileNotFoundError:
        return None


def test_bench_reports_every_figure(bundle, clip, tmp_path):
    args = [sys.executable, "-m", "llasm.cli.bench", "--bundle", str(bundle), "--audio", str(clip),
            "--lengths", "1,3", "--repeats", "1", "--threads", "1", "--json"]
    cascade = _cascade_whisper()
    if cascade:
        args += ["--cascade-whisper", cascade]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "leaked" not in r.stderr, r.stderr  # each child exits on its own, nothing left to the resource tracker
    out = json.loads(r.stdout)
    for key in ("first_token_ms", "encode_ms", "prefill_ms", "rows"):
        assert set(out["llasm"][key]) == {"1.0", "3.0"}
    assert out["llasm"]["rows"]["3.0"] > out["llasm"]["rows"]["1.0"]
    assert out["llasm"]["peak_rss_mb"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["plain_llama_tokens_per_s"] > 0 and "decode_vs_plain_llama" in out["ratios"]
    listening = out["listening"]  # the clip fed in real time: at 3 s most of its rows are prefilled before its end
    assert set(listening["first_token_ms"]) == {"1.0", "3.0"} and min(listening["first_token_ms"].values()) > 0
    assert 0 < listening["rows"]["3.0"] < out["llasm"]["rows"]["3.0"]
    paused = out["listening_pause"]  # then quiet: the whole turn is prefilled before the end, its 2 boundary rows too
    assert paused["rows"]["3.0"] >= out["llasm"]["rows"]["3.0"] - 2
    for name in ("listening", "listening_pause"):
        assert set(out["ratios"][f"{name}_first_token_vs_whole_clip"]) == {"1.0", "3.0"}
    if cascade:
        assert set(out["cascade"]["first_token_ms"]) == {"1.0", "3.0"}
        assert "first_token_vs_cascade" in out["ratios"]


def test_bench_prints_a_table_by_default(bundle, clip):
    r = subprocess.run([sys.executable, "-m", "llasm.cli.bench", "--bundle", str(bundle), "--audio", str(clip),
                        "--lengths", "1,2", "--repeats", "1", "--threads", "1", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(FALLBACK_NOTE)]
    assert not notes, r.stderr  # -q: no progress, no log lines; a warning that llama.cpp falls back may come once
    lines = r.stdout.splitlines()
    assert lines[0].startswith("machine: ") and lines[1].split()[:2] == ["audio", "s"] and "cascade" not in lines[1]
    assert "listening" in lines[1] and "paused" in lines[1]
    assert [line.split()[0] for line in lines[2:4]] == ["1.0", "2.0"]  # one row per length: 5 figures, 2 + 2 listening
    assert all(len(line.split()) == 11 and float(line.split()[4]) > 0 < float(line.split()[6]) for line in lines[2:4])
    assert lines[4].startswith("decode: ") and lines[5].startswith("peak RSS: LLaSM ") and len(lines) == 6


def test_bench_rejects_bad_lengths(bundle, clip):
    r = subprocess.run([sys.executable, "-m", "llasm.cli.bench", "--bundle", str(bundle), "--audio", str(clip),
                        "--lengths", "one,two"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("llasm-bench: error: --lengths")


def test_bench_rejects_a_pause_that_is_not_positive(bundle, clip):
    r = subprocess.run([sys.executable, "-m", "llasm.cli.bench", "--bundle", str(bundle), "--audio", str(clip),
                        "--lengths", "1", "--pause", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "llasm-bench: error: --pause must be > 0 seconds, got 0.0"


def test_clip_of_length_tiles_and_crops():
    import numpy as np

    from llasm.runtime.bench import clip_of_length

    a, b = np.ones(16000, np.float32), np.zeros(8000, np.float32)
    x = clip_of_length([a, b], 2.0)
    assert x.size == 32000 and x[:16000].all() and not x[16000:24000].any() and x[24000:].all()
