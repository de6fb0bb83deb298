"""How one clip differs from the plain voice (`Variation`, recorded in its manifest row) and how it is made (`render`).

Every step is numpy only and draws its randomness from the variation's own `seed`, so a row's voice, text and
variation reproduce its clip exactly:

    speed         engine-native tempo, 0.9-1.1 (piper length_scale, Kokoro speed, espeak words per minute, ...)
    formant       spectral envelope warped by formant_ratio (0.9-1.1) with the pitch kept: cepstral envelope per
                  STFT frame, the fine structure left alone (--augment)
    pitch         resample-based, +-1.5 semitones: pitch, formants and tempo move together
    reverb        an exponentially decaying noise impulse response (RT60 0.2-0.9 s, direct-to-reverberant ratio
                  0-12 dB) on 30% of clips (--augment)
    level         random lead/trail silence (0.05-0.4 s) and speech peak (-12..-1 dBFS)
    noise         white, pink or brown noise at 5-20 dB SNR on 80% of clips (--noise)
    telephone     8 kHz, 300-3400 Hz band, G.711 mu-law, on 10% of clips (--augment)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..runtime.audio import SAMPLE_RATE, resample
from .voices import Engine, TTSError

NOISE_COLORS = ("white", "pink", "brown")
TELEPHONE_RATE, TELEPHONE_BAND = 8_000, (300.0, 3400.0)
REVERB_SHARE, TELEPHONE_SHARE, NOISE_SHARE = 0.3, 0.1, 0.8


@dataclass(frozen=True)
class Variation:
    """How one clip differs from the plain voice; stored in its manifest row."""

    speed: float = 1.0
    pitch_semitones: float = 0.0
    lead_s: float = 0.0
    trail_s: float = 0.0
    peak_dbfs: float = -1.0
    snr_db: float | None = None  # None = clean
    noise_color: str = "white"
    formant_ratio: float = 1.0
    rt60_s: float | None = None  # None = dry
    drr_db: float = 6.0
    telephone: bool = False
    seed: int = 0  # the noise's and the impulse response's randomness

    def __post_init__(self):
        if self.noise_color not in NOISE_COLORS:
            raise ValueError(f"noise_color must be one of {NOISE_COLORS}, got {self.noise_color!r}")
        if not (0.5 <= self.formant_ratio <= 2.0 and self.speed > 0):
            raise ValueError(f"formant_ratio must be in [0.5, 2] and speed > 0, got {self.formant_ratio}, "
                             f"{self.speed}")

    @classmethod
    def sample(cls, rng: np.random.Generator, noise: bool, augment: bool = False) -> "Variation":
        u = lambda lo, hi, nd: round(float(rng.uniform(lo, hi)), nd)  # noqa: E731
        speed, pitch = u(0.9, 1.1, 3), u(-1.5, 1.5, 2)
        lead, trail, peak = u(0.05, 0.4, 3), u(0.05, 0.4, 3), u(-12.0, -1.0, 1)
        noisy = noise and rng.random() < NOISE_SHARE
        snr, color = (u(5.0, 20.0, 1), NOISE_COLORS[int(rng.integers(len(NOISE_COLORS)))]) if noisy else (None, "white")
        formant, rt60, drr, phone = 1.0, None, 6.0, False
        if augment:
            formant = u(0.9, 1.1, 3)
            if rng.random() < REVERB_SHARE:
                rt60, drr = u(0.2, 0.9, 2), u(0.0, 12.0, 1)
            phone = bool(rng.random() < TELEPHONE_SHARE)
        return cls(speed, pitch, lead, trail, peak, snr, color, formant, rt60, drr, phone, int(rng.integers(2**31)))

    def to_dict(self) -> dict:
        return asdict(self)


def render(engine: Engine, text: str, variation: Variation) -> np.ndarray:
    """Speak `text` with `variation`: float32 mono samples at 16 kHz. Raises TTSError for empty or silent output."""
    samples, rate = engine.speak(text, speed=variation.speed)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0 or not np.isfinite(samples).all() or float(np.abs(samples).max()) < 1e-4:
        raise TTSError(f"{engine.name} gave empty or silent audio for {text!r}")
    return apply(samples, rate, variation)


def apply(samples: np.ndarray, rate: int, variation: Variation) -> np.ndarray:
    """Everything after the voice: formants, pitch (to 16 kHz), reverb, silence, level, noise, telephone."""
    rng = np.random.default_rng(variation.seed)
    if variation.formant_ratio != 1.0:
        samples = shift_formants(samples, rate, variation.formant_ratio)
    # Pitch: play the samples as if they were recorded at rate * factor (higher and faster), then go to 16 kHz.
    factor = 2.0 ** (variation.pitch_semitones / 12.0)
    samples = resample(samples, int(round(rate * factor)), SAMPLE_RATE)
    if variation.rt60_s is not None:
        samples = reverberate(samples, variation.rt60_s, variation.drr_db, rng)
    lead, trail = (np.zeros(int(s * SAMPLE_RATE), np.float32) for s in (variation.lead_s, variation.trail_s))
    samples = np.concatenate([lead, samples, trail])
    samples *= np.float32(10 ** (variation.peak_dbfs / 20) / np.abs(samples).max())
    if variation.snr_db is not None:
        power = float(np.mean(samples.astype(np.float64) ** 2))
        sigma = np.sqrt(power / 10 ** (variation.snr_db / 10))
        samples = samples + (sigma * colored_noise(samples.size, variation.noise_color, rng)).astype(np.float32)
    if variation.telephone:
        samples = telephone(samples)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def _frames(x: np.ndarray, n_fft: int, hop: int) -> tuple[np.ndarray, int]:
    pad = np.concatenate([np.zeros(n_fft, np.float64), x.astype(np.float64), np.zeros(n_fft + hop, np.float64)])
    n = 1 + (pad.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n)[:, None]  # (T, n_fft)
    return pad[idx], pad.size


def shift_formants(x: np.ndarray, rate: int, ratio: float) -> np.ndarray:
    """Move the spectral envelope (formants) by `ratio` and keep the harmonics (pitch): per STFT frame, the
    envelope is the low-quefrency part of the log spectrum; the frame is scaled by warped / original envelope."""
    n_fft = 1 << int(np.ceil(np.log2(0.04 * rate)))  # ~40 ms frames
    hop = n_fft // 4
    window = np.hanning(n_fft + 1)[:-1]
    frames, total = _frames(x, n_fft, hop)
    spec = np.fft.rfft(frames * window, axis=1)  # (T, K)
    cep = np.fft.irfft(np.log(np.abs(spec) + 1e-7), n=n_fft, axis=1)
    lifter = max(8, int(0.0015 * rate))  # below the shortest pitch period (~2.5 ms)
    cep[:, lifter:n_fft - lifter + 1] = 0.0
    env = np.fft.rfft(cep, axis=1).real  # (T, K) log envelope
    pos = np.arange(spec.shape[1]) / ratio  # warped(k) = envelope(k / ratio)
    i0 = np.clip(np.floor(pos).astype(int), 0, spec.shape[1] - 1)
    i1, frac = np.minimum(i0 + 1, spec.shape[1] - 1), np.clip(pos - np.floor(pos), 0.0, 1.0)
    warped = env[:, i0] * (1 - frac) + env[:, i1] * frac
    spec *= np.exp(np.clip(warped - env, -4.0, 4.0))
    out = np.zeros(total, np.float64)
    norm = np.zeros(total, np.float64)
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * window
    for t in range(frames.shape[0]):  # overlap-add
        out[t * hop: t * hop + n_fft] += frames[t]
        norm[t * hop: t * hop + n_fft] += window ** 2
    out = out / np.maximum(norm, 1e-3)
    return out[n_fft: n_fft + x.size].astype(np.float32)


def reverberate(x: np.ndarray, rt60_s: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """x convolved with a synthetic room: a unit direct path, then Gaussian noise decaying 60 dB in rt60_s whose
    energy sits drr_db below the direct path's; the tail (up to 1.2 s) lengthens the clip."""
    n = int(SAMPLE_RATE * min(1.2, 1.5 * rt60_s))
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # 10 ** (-60 / 20) = exp(-6.9078)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # the first reflections arrive after the direct sound
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    ir = tail
    ir[0] = 1.0
    size = x.size + n - 1
    nfft = 1 << int(np.ceil(np.log2(size)))
    y = np.fft.irfft(np.fft.rfft(x.astype(np.float64), nfft) * np.fft.rfft(ir, nfft), nfft)[:size]
    return y.astype(np.float32)


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise whose power falls as 1/f**0 (white), 1/f (pink) or 1/f**2 (brown)."""
    noise = rng.standard_normal(max(n, 4))
    if color != "white":
        f = np.fft.rfftfreq(noise.size)
        gain = np.zeros_like(f)
        gain[1:] = f[1:] ** (-0.5 if color == "pink" else -1.0)
        noise = np.fft.irfft(np.fft.rfft(noise) * gain, noise.size)
    return noise[:n] / np.sqrt(np.mean(noise ** 2))


def telephone(x: np.ndarray) -> np.ndarray:
    """A narrowband call: 8 kHz, 300-3400 Hz (soft edges), 8-bit mu-law, back at 16 kHz."""
    y = resample(x, SAMPLE_RATE, TELEPHONE_RATE).astype(np.float64)
    f = np.fft.rfftfreq(y.size, 1.0 / TELEPHONE_RATE)
    lo, hi = TELEPHONE_BAND
    gain = np.clip((f - (lo - 100)) / 200, 0, 1) * np.clip(((hi + 100) - f) / 200, 0, 1)
    y = np.fft.irfft(np.fft.rfft(y) * gain, y.size)
    mu = 255.0
    y = np.clip(y, -1.0, 1.0)
    code = np.round(np.sign(y) * np.log1p(mu * np.abs(y)) / np.log1p(mu) * 127) / 127  # 8-bit mu-law
    y = np.sign(code) * ((1 + mu) ** np.abs(code) - 1) / mu
    return resample(y.astype(np.float32), TELEPHONE_RATE, SAMPLE_RATE)[: x.size]


def describe(noise: bool, augment: bool) -> str:
    """The variation ranges of a build, in words (its README and dataset.json)."""
    parts = ["speed 0.9-1.1", "pitch +-1.5 semitones", "peak -12..-1 dBFS"]
    if augment:
        parts += ["formant ratio 0.9-1.1", f"room reverberation (RT60 0.2-0.9 s) on {REVERB_SHARE:.0%} of clips",
                  f"telephone band on {TELEPHONE_SHARE:.0%}"]
    parts.append(f"white/pink/brown noise at 5-20 dB SNR on {NOISE_SHARE:.0%} of clips" if noise else "no noise")
    return ", ".join(parts)
