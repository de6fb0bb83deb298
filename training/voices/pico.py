"""SVOX Pico (en-US; en-GB is held out) through py-nanotts, in process: 16 kHz, speed native."""
from __future__ import annotations

import threading

import numpy as np

from .base import TTSError
from .catalog import HINTS, Voice

SAMPLE_RATE = 16_000
_LOCK = threading.Lock()  # the C engine is not documented as reentrant


class PicoEngine:
    def __init__(self, voice: Voice):
        try:
            from py_nanotts import NanoTTS
        except ImportError as e:
            raise TTSError(f"the pico engine needs py-nanotts: {HINTS['pico']} ({e})") from None
        self.tts, self.voice, self.name, self.lang = NanoTTS(), voice.voice, voice.name, voice.lang

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        with _LOCK:
            pcm = self.tts.speak(text, voice=self.voice, speed=speed)
        if not pcm:
            raise TTSError(f"{self.name} gave no audio for {text!r}")
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, SAMPLE_RATE
