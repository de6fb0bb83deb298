"""Augmentation: each effect does what its parameters say, and a manifest row's variation reproduces its clip."""
import json

import numpy as np
import pytest

from llasm.training import augment
from llasm.training.augment import Variation
from llasm.training.speech_data import BuildConfig, build

from test_speech_data import SineVoice

sf = pytest.importorskip("soundfile")
RATE = 16_000


def band_power(x, lo, hi, rate=RATE):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / rate)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_sampled_variations_cover_the_ranges_and_shares():
    rng = np.random.default_rng(0)
    vs = [Variation.sample(rng, noise=True, augment=True) for _ in range(2000)]
    assert all(0.9 <= v.speed <= 1.1 and 0.9 <= v.formant_ratio <= 1.1 for v in vs)
    noisy = [v for v in vs if v.snr_db is not None]
    assert 0.75 < len(noisy) / 2000 < 0.85 and all(5 <= v.snr_db <= 20 for v in noisy)
    assert {v.noise_color for v in noisy} == set(augment.NOISE_COLORS)
    assert 0.26 < sum(v.rt60_s is not None for v in vs) / 2000 < 0.34
    assert 0.07 < sum(v.telephone for v in vs) / 2000 < 0.13
    plain = Variation.sample(np.random.default_rng(0), noise=False)
    assert (plain.snr_db, plain.rt60_s, plain.telephone, plain.formant_ratio) == (None, None, False, 1.0)
    with pytest.raises(ValueError, match="noise_color must be one of"):
        Variation(noise_color="purple")


def test_formant_shift_moves_the_envelope_and_keeps_the_pitch():
    t = np.arange(RATE) / RATE
    f0 = 150.0
    x = sum(np.exp(-((k * f0 - 1000.0) / 300.0) ** 2) * np.sin(2 * np.pi * k * f0 * t) for k in range(1, 40))
    y = augment.shift_formants(x.astype(np.float32), RATE, 1.15)
    assert y.shape == x.shape and y.dtype == np.float32

    def centroid(s):
        spec, f = np.abs(np.fft.rfft(s)) ** 2, np.fft.rfftfreq(s.size, 1 / RATE)
        return float((spec * f).sum() / spec.sum())

    assert 1.08 < centroid(y) / centroid(x) < 1.3  # the smoothed envelope overshoots a little
    assert 0.85 < centroid(augment.shift_formants(x.astype(np.float32), RATE, 0.9)) / centroid(x) < 0.95
    spec = np.abs(np.fft.rfft(y))
    f = np.fft.rfftfreq(y.size, 1 / RATE)
    peaks = f[np.argsort(spec)[-5:]]
    assert all(abs(p / f0 - round(p / f0)) < 0.02 for p in peaks)  # still harmonics of 150 Hz


def test_reverb_decays_at_its_rt60_with_its_direct_to_reverberant_ratio():
    impulse = np.zeros(RATE // 10, np.float32)
    impulse[0] = 1.0
    ir = augment.reverberate(impulse, 0.5, 6.0, np.random.default_rng(1))
    assert ir.size == impulse.size + int(RATE * 0.75) - 1 and ir[0] == pytest.approx(1.0)
    tail = ir[1:].astype(np.float64)
    assert 10 * np.log10(1.0 / np.sum(tail ** 2)) == pytest.approx(6.0, abs=0.01)
    early, late = (np.mean(tail[int(a * RATE): int(b * RATE)] ** 2) for a, b in ((0.05, 0.1), (0.3, 0.35)))
    assert 10 * np.log10(early / late) == pytest.approx(60 * 0.25 / 0.5, abs=3.0)  # 60 dB per RT60


def test_telephone_keeps_300_to_3400_hz_and_colored_noise_has_its_slope():
    noise = np.random.default_rng(2).standard_normal(RATE).astype(np.float32) * 0.1
    phone = augment.telephone(noise)
    assert phone.size == noise.size
    inside = band_power(phone, 500, 3000) / 2500
    assert band_power(phone, 3800, 8000) / 4200 < 1e-3 * inside and band_power(phone, 20, 150) / 130 < 1e-2 * inside
    rng = np.random.default_rng(3)
    slopes = {}
    for color in augment.NOISE_COLORS:
        n = augment.colored_noise(RATE, color, rng)
        assert np.mean(n ** 2) == pytest.approx(1.0, rel=1e-6)
        slopes[color] = band_power(n, 100, 400) / band_power(n, 4000, 7000)
    assert slopes["white"] < 0.2 < 2 < slopes["pink"] < slopes["brown"]


def test_a_row_reproduces_its_clip_from_its_variation(tmp_path):
    config = BuildConfig(out=tmp_path / "d", langs=("en",), limit=20, seed=5, noise=True, augment=True,
                         sources=("facts",))
    build(config, engines={"en": SineVoice()}, progress=False)
    rows = [json.loads(line) for name in ("asr.jsonl", "asr.heldout.jsonl")
            for line in (config.out / name).read_text(encoding="utf-8").splitlines()]
    variations = [Variation(**r["variation"]) for r in rows]
    assert any(v.rt60_s for v in variations) and any(v.snr_db for v in variations)
    assert len({v.seed for v in variations}) == len(rows)
    for r, v in zip(rows[:6], variations):
        clip, _ = sf.read(str(config.out / r["audio"]), dtype="float32")
        again = augment.render(SineVoice(), r["text"], v)
        assert np.abs(clip - again).max() < 1.5 / 32768  # the same samples, up to the WAV's 16 bits
    rebuilt = BuildConfig(out=tmp_path / "again", langs=("en",), limit=20, seed=5, noise=True, augment=True,
                          sources=("facts",))
    build(rebuilt, engines={"en": SineVoice()}, progress=False)
    assert (rebuilt.out / "asr.jsonl").read_text() == (config.out / "asr.jsonl").read_text()  # seeded
