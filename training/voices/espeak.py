"""espeak-ng 1.52 from espeakng-loader, through ctypes: a voice (any espeak-ng voice) and an IPA phonemizer."""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .base import TTSError
from .catalog import ESPEAK_HINT

_LOCK = threading.Lock()  # libespeak-ng keeps one global synthesizer per process
_STATE: dict = {}  # "lib", "rate", "callback", "buffer" once initialised
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8, _RATE, _DEFAULT_WPM = 2, 1, 1, 1, 175
_PHONEMES_IPA_TIED = 0x02 | 0x80 | (ord("^") << 8)  # IPA, "^" tying the letters of one phoneme (d^ʒ)


def _espeak() -> dict:
    """Load espeakng-loader's libespeak-ng once, in synchronous mode with a callback that collects samples."""
    if _STATE:
        return _STATE
    try:
        import espeakng_loader
    except ImportError:
        raise TTSError(f"espeak-ng needs espeakng-loader: {ESPEAK_HINT}") from None
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
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
    _STATE.update(lib=lib, rate=rate, callback=callback, buffer=buffer)
    return _STATE


def _set_voice(lib, voice: str) -> None:
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise TTSError(f"espeak-ng has no voice {voice!r} (US English 'en-us', variants like en-us+f3, en-gb-x-rp)")


class EspeakEngine:
    """espeak-ng 1.52 (espeakng-loader's library and data); speed maps to words per minute."""

    def __init__(self, voice: str = "en-us", lang: str = "en"):
        with _LOCK:
            _set_voice(_espeak()["lib"], voice)
        self.voice, self.lang = voice, lang
        self.name = f"espeak:{voice}"

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        data = text.encode("utf-8")
        with _LOCK:
            state = _espeak()
            lib, buffer = state["lib"], state["buffer"]
            buffer.clear()
            _set_voice(lib, self.voice)
            lib.espeak_SetParameter(_RATE, int(round(_DEFAULT_WPM * speed)), 0)
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            samples = np.concatenate(buffer) if buffer else np.zeros(0, np.int16)
            buffer.clear()
        if err != 0:
            raise TTSError(f"espeak-ng error {err} for {text!r}")
        return samples.astype(np.float32) / 32768.0, state["rate"]


def ipa(text: str, voice: str = "en-us") -> str:
    """espeak-ng's IPA for `text` with stress marks and "^" ties (d^ʒ, a^ɪ), its clauses joined by spaces
    (espeak-ng drops punctuation: callers split at it first)."""
    pieces = []
    with _LOCK:
        lib = _espeak()["lib"]
        _set_voice(lib, voice)
        ptr = ctypes.c_char_p(text.encode("utf-8"))
        while ptr.value:
            out = lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, _PHONEMES_IPA_TIED)
            pieces.append((out or b"").decode("utf-8", "replace").strip())
    return " ".join(p for p in pieces if p)
