"""Push-to-talk: the Recorder fed by fake input streams, the session loop with the tiny bundle, and the real terminal
UI under tmux. No audio device is used; the terminal test checks the note that this machine shows for its microphone
(no sounddevice or PortAudio, or no input device), and leaves the key alone where a microphone is there."""
import io
import json
import re
import shutil
import subprocess
import sys
import time
import types
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

import tiny
from llasm.runtime.audio import resample
from llasm.runtime.mic import INSTALL_HINT, MicError, Recorder, input_device, rms_db, trim_silence

SR = 16_000


class FakeStream:
    """Stands in for sounddevice.InputStream: start() delivers `signal` to the callback in blocks, push() more."""

    def __init__(self, callback, signal, samplerate=SR, channels=1, block=320, fail=None):
        self.callback, self.signal, self.samplerate = callback, signal, samplerate
        self.channels, self.block, self.fail = channels, block, fail
        self.active = self.closed = False

    def start(self):
        if self.fail:
            raise self.fail
        self.active = True
        for i in range(0, self.signal.size, self.block):
            self.push(self.signal[i:i + self.block])

    def push(self, x):
        indata = np.repeat(x.astype(np.float32)[:, None], self.channels, axis=1)  # (frames, channels)
        self.callback(indata, len(x), None, "")

    def stop(self):
        self.active = False

    def close(self):
        self.closed = True


def fake(signal=np.zeros(0, np.float32), **kw):
    """A stream factory for Recorder; the stream it made is in .streams."""
    def factory(callback):
        factory.streams.append(FakeStream(callback, signal, **kw))
        return factory.streams[-1]
    factory.streams = []
    return factory


def padded_speech(seed=0):
    """0.8 s of digital silence, 1 s of speech, 1 s of low noise (-60 dBFS)."""
    noise = 1e-3 * np.random.default_rng(seed).standard_normal(SR).astype(np.float32)
    return np.concatenate([np.zeros(int(0.8 * SR), np.float32), tiny.speech(1.0, seed=seed), noise])


def test_imports_load_neither_sounddevice_nor_torch():
    code = ("import sys, llasm.runtime.mic, llasm.cli.local; "
            "print(sorted(m for m in ('sounddevice', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_start_stop_returns_the_samples():
    x = tiny.speech(1.0)
    rec = Recorder(stream_factory=fake(x), trim=False)
    rec.start()
    assert rec.recording and rec.seconds == pytest.approx(1.0)
    assert rec.level_db == pytest.approx(rms_db(x[-320:]))
    out = rec.stop()
    assert out.dtype == np.float32 and np.array_equal(out, x)
    assert not rec.recording and rec.level_db == -100.0
    with pytest.raises(MicError, match="not recording"):
        rec.stop()


def test_48k_stereo_device_is_mixed_down_and_resampled():
    x48 = tiny.speech(1.0, rate=48_000)
    rec = Recorder(stream_factory=fake(x48, samplerate=48_000, channels=2, block=960), trim=False)
    rec.start()
    out = rec.stop()
    assert abs(out.size - SR) <= 0.01 * SR
    ref = tiny.speech(1.0)  # the same voiced sound computed at 16 kHz (only the small noise differs)
    n = min(out.size, ref.size) - 200
    assert np.corrcoef(out[100:n], ref[100:n])[0, 1] > 0.95


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_a_sink_gets_the_recording_as_it_comes(rate):
    x = padded_speech() if rate == SR else tiny.speech(1.0, rate=rate)
    got = []
    rec = Recorder(stream_factory=fake(x, samplerate=rate, block=999), trim=False)
    rec.start(sink=got.append)
    n = len(got)
    assert n > 10 and all(b.dtype == np.float32 and b.ndim == 1 for b in got)
    out = rec.stop()
    assert len(got) >= n  # the last samples come at stop()
    np.testing.assert_array_equal(np.concatenate(got), out)  # 16 kHz: block by block, what stop() returns
    np.testing.assert_allclose(out, resample(x, rate, SR), atol=1e-6)  # ...which is all of it, resampled
    total = len(got)
    rec.start()  # the next recording without a sink: nothing more is handed out
    assert rec.stop().size == out.size and len(got) == total


def test_trimming_removes_silence_and_keeps_speech():
    x = padded_speech()
    rec = Recorder(stream_factory=fake(x))
    rec.start()
    out = rec.stop()
    margin = int(0.2 * SR)
    assert out.size == SR + 2 * margin  # speech starts and ends on a 20 ms frame here
    assert np.array_equal(out[margin:margin + SR], tiny.speech(1.0))  # every speech sample kept, in place
    assert not out[:margin].any() and rms_db(out[-margin:]) < -55  # only the margins of silence/noise remain
    assert trim_silence(tiny.speech(1.0)).size == SR  # speech throughout: nothing cut
    assert trim_silence(x[:int(0.8 * SR)]).size == 0  # silence only: nothing left
    noisy = np.concatenate([5e-3 * np.random.default_rng(1).standard_normal(SR).astype(np.float32),
                            tiny.speech(0.5)])  # a -46 dBFS floor: the threshold follows it
    assert 0.65 * SR <= trim_silence(noisy).size <= 0.75 * SR


def test_length_cap_stops_the_recording():
    rec = Recorder(stream_factory=fake(tiny.speech(1.0)), max_seconds=0.5, trim=False)
    rec.start()
    assert rec.capped and rec.seconds == pytest.approx(0.5)
    out = rec.stop()
    assert out.size == SR // 2
    with pytest.raises(ValueError, match="max_seconds"):
        Recorder(stream_factory=fake(), max_seconds=0)


def test_level_rises_with_a_loud_block():
    factory = fake()
    rec = Recorder(stream_factory=factory)
    rec.start()
    stream = factory.streams[0]
    stream.push(1e-3 * np.ones(320, np.float32))
    quiet = rec.level_db
    stream.push(0.5 * np.sin(2 * np.pi * 440 * np.arange(320) / SR).astype(np.float32))
    assert quiet == pytest.approx(-60, abs=0.5) and rec.level_db == pytest.approx(-9, abs=0.5)
    rec.stop()
    assert stream.closed


def test_missing_sounddevice_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import sounddevice -> ImportError
    rec = Recorder()
    with pytest.raises(MicError, match="pip install sounddevice; apt install libportaudio2") as e:
        rec.start()
    assert isinstance(e.value, ValueError) and INSTALL_HINT in str(e.value) and not rec.recording
    with pytest.raises(MicError, match="push-to-talk needs sounddevice"):
        input_device()


def fake_sounddevice(devices, rates=(48_000,)):
    """A stand-in sounddevice module: `devices` maps None/names to query_devices dicts; `rates` are supported."""
    class PortAudioError(Exception):
        pass

    def query_devices(device=None, kind=None):
        if device not in devices:
            raise PortAudioError(f"Error querying device {-1 if device is None else device}")
        return devices[device]

    def check_input_settings(device=None, channels=None, dtype=None, samplerate=None):
        if samplerate not in rates:
            raise PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(samplerate, channels, dtype, device, callback):
        sd.opened.append((samplerate, channels, dtype, device))
        return FakeStream(callback, tiny.speech(1.0, rate=int(samplerate)), samplerate=samplerate, block=960)

    sd = types.SimpleNamespace(PortAudioError=PortAudioError, query_devices=query_devices, opened=[],
                               check_input_settings=check_input_settings, InputStream=InputStream)
    return sd


def test_sounddevice_device_selection_and_errors(monkeypatch):
    sd = fake_sounddevice({None: {"name": "Fake Mic", "default_samplerate": 48_000.0}, 2: {"name": "USB"}})
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    rec = Recorder(trim=False)
    rec.start()
    out = rec.stop()
    assert sd.opened == [(48_000, 1, "float32", None)]  # 16 kHz refused: the device's own rate, resampled
    assert abs(out.size - SR) <= 0.01 * SR
    assert input_device("2")["name"] == "USB"  # a digit string is a device index
    with pytest.raises(MicError, match="no input device 'headset'.*--mic-device"):
        Recorder("headset").start()
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice({}))
    with pytest.raises(MicError, match="no default input device: Error querying device -1"):
        Recorder().start()
    broken = Recorder(stream_factory=fake(fail=RuntimeError("Device unavailable [PaErrorCode -9985]")))
    with pytest.raises(MicError, match="microphone error: Device unavailable"):
        broken.start()
    assert not broken.recording


# --- the session loop, with the tiny bundle ---------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def lines(*items, delay=0.0):
    """read_line for the loop: the given lines, then EOF; `delay` seconds before each."""
    it = iter(items)

    def read_line(prompt=""):
        time.sleep(delay)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read_line


@pytest.fixture(scope="module")
def model(bundle):
    from llasm import LLaSM

    m = LLaSM.load(bundle)
    yield m
    m.close()


ARGS = SimpleNamespace(max_tokens=3, temperature=0.0, json=True)


def replies(capsys):
    return [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]


def test_push_to_talk_turn_gets_a_reply(model, capsys):
    from llasm.cli.local import _meter_line, interactive

    chat = model.chat()
    err = Terminal()
    interactive(chat, ARGS, Recorder(stream_factory=fake(padded_speech())), lines("", "", "/quit"), err)
    (reply,) = replies(capsys)
    assert reply["tokens"] == 3 and reply["audio_seconds"] == pytest.approx(1.4)  # trimmed to speech + margins
    assert isinstance(chat.turns[0].parts[0], np.ndarray) and chat.turns[1].role == "assistant"
    shown = err.getvalue()
    assert "press Enter to talk" in shown and "(asking with 1.4 s of speech)" in shown
    assert re.search(r"\r● REC  2\.8 s  [▮▯]{8}  \(Enter stops\)\x1b\[K", shown)  # drawn in place on a terminal
    loud, quiet = (_meter_line(SimpleNamespace(level_db=db, seconds=2.4)) for db in (-9.0, -80.0))
    assert loud.startswith("● REC  2.4 s  ▮▮▮▮▮▮▮▯") and quiet.startswith("● REC  2.4 s  ▯▯▯▯▯▯▯▯")


def test_silent_recording_is_an_error_and_the_session_goes_on(model, capsys):
    from llasm.cli.local import interactive

    chat = model.chat()
    err = io.StringIO()
    interactive(chat, ARGS, Recorder(stream_factory=fake(np.zeros(SR, np.float32))), lines("", "", "hello"), err)
    (reply,) = replies(capsys)  # the text turn after the silent one
    assert reply["audio_seconds"] == 0 and reply["tokens"] == 3
    errors = [l for l in err.getvalue().splitlines() if l.startswith("error:")]
    assert errors == ["error: heard no speech (the recording is silent after trimming); press Enter to try again"]
    assert "● REC (Enter stops)" in err.getvalue()  # no redrawing when stderr is not a terminal
    assert [t.role for t in chat.turns] == ["user", "assistant"] and chat.turns[0].parts == ("hello",)


def test_cap_and_no_microphone_in_the_loop(model, capsys, monkeypatch):
    from llasm.cli.local import interactive

    err = io.StringIO()
    capped = Recorder(stream_factory=fake(tiny.speech(1.0)), max_seconds=0.5)
    interactive(model.chat(), ARGS, capped, lines("", "", delay=0.3), err)  # Enter comes after the meter looked
    (reply,) = replies(capsys)
    assert "recording stopped at the 0.5 s limit: press Enter to send" in err.getvalue()
    assert reply["audio_seconds"] == pytest.approx(0.5)

    monkeypatch.setitem(sys.modules, "sounddevice", None)
    err = io.StringIO()
    interactive(model.chat(), ARGS, Recorder(), lines("", "hello", "/quit"), err)
    assert len(replies(capsys)) == 1  # typing still works after the failed push-to-talk
    note = [l for l in err.getvalue().splitlines() if l.startswith("no microphone")]
    assert len(note) == 1 and INSTALL_HINT in note[0]


# --- the real terminal, under tmux -------------------------------------------------------------------------------

def test_terminal_session_under_tmux(bundle, model, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux): the terminal UI test needs it")
    expected = model.chat().send(text="hello", max_tokens=3).text.strip()
    try:
        input_device(None)
        why_no_mic = None  # a machine with a microphone: pressing Enter would record from it, so the test doesn't
    except MicError as e:
        why_no_mic = str(e).strip().splitlines()[0]  # the note this machine must show
    sock, rc = f"llasm-test-{uuid.uuid4().hex[:8]}", tmp_path / "rc"
    cmd = f"{sys.executable} -m llasm.cli.local --bundle {bundle} --max-tokens 3; echo $? > {rc}; sleep 60"
    tmux = ["tmux", "-L", sock]
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", cmd], check=True, timeout=30)

    def screen():
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=30).stdout

    def wait_for(check, what, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = screen()
            if check(text):
                return text
            time.sleep(0.1)
        pytest.fail(f"no {what} on the terminal within {timeout} s:\n{screen()}")

    def prompts(text):  # capture-pane drops trailing spaces: an empty prompt reads ">"
        return [l.rstrip() for l in text.splitlines() if l.startswith(">")]

    try:
        wait_for(lambda t: "press Enter to talk" in t and prompts(t) == [">"], "greeting and prompt")
        subprocess.run([*tmux, "send-keys", "hello", "Enter"], check=True, timeout=30)
        text = wait_for(lambda t: len(prompts(t)) == 2, "second prompt after the answer")
        shown = text.splitlines()
        answer = shown[shown.index("> hello") + 1]
        assert answer.strip() and "error" not in answer
        if expected.isascii() and expected.isprintable():
            assert answer.strip() == expected
        if why_no_mic is not None:  # what this machine lacks: sounddevice or PortAudio, or an input device
            subprocess.run([*tmux, "send-keys", "Enter"], check=True, timeout=30)
            text = wait_for(lambda t: "no microphone" in t and len(prompts(t)) == 3, "no-microphone note")
            assert re.sub(r"\s", "", f"no microphone: {why_no_mic}") in re.sub(r"\s", "", text)  # wrapped lines
        subprocess.run([*tmux, "send-keys", "/quit", "Enter"], check=True, timeout=30)
        end = time.monotonic() + 30
        while not (rc.exists() and rc.read_text().strip()) and time.monotonic() < end:
            time.sleep(0.1)
        assert rc.read_text().strip() == "0", screen()
        assert "Traceback" not in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
