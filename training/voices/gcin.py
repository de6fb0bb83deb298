"""gcin-voice (Debian main): a man recorded reading every Mandarin syllable in every tone, one Ogg file per syllable
(3.ogg: Edward Der-Hua Liu, GPL-3 or LGPL-3). A sentence is read syllable by syllable (pypinyin's zhuyin, digits as
Chinese numerals) and the recordings are joined with short gaps: a human voice, without the coarticulation of
connected speech. Held out: evaluation sets only. (The package's other files, 5.ogg, are a singing voicebank's
samples: through the default bundle's Whisper-base graphs, 97% CER.)

A folder is named by the syllable's zhuyin and its tone: none for the first, 2-4 for ˊˇˋ, 1 for the neutral ˙
(recorded for a few syllables only; the others read it in the first tone). speed plays the joined recordings
faster, as a tape would: the pitch moves with it (1.1: +1.65 semitones).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from .base import TTSError
from .catalog import HINTS, Voice

OGG = Path("/usr/share/gcin-voice/ogg")
FILES = {"liu": "3.ogg"}
TONE_DIGITS = {"ˊ": "2", "ˇ": "3", "ˋ": "4", "˙": "1"}
SAMPLE_RATE = 44_100
GAP_S = 0.03  # between the syllables of a word or phrase
PAUSE_S = 0.25  # at punctuation
EDGE = 0.03  # a recording's silence is trimmed where it stays below this share of its peak
PUNCTUATION = re.compile(r"[\s，。！？；：、,.!?;:…—（）()“”\"'《》]+")


class GcinEngine:
    def __init__(self, voice: Voice):
        if not OGG.is_dir():
            raise TTSError(f"gcin-voice is not installed ({OGG}): {HINTS['gcin']}")
        try:
            import cn2an  # noqa: F401
            import pypinyin  # noqa: F401
            import soundfile  # noqa: F401
        except ImportError as e:
            raise TTSError(f"the gcin voice needs pypinyin, cn2an and soundfile: {HINTS['gcin']} ({e})") from None
        self.file, self.name, self.lang = FILES[voice.voice], voice.name, voice.lang

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        parts = []
        for syllable in syllables(text):
            if syllable is None:
                if parts:
                    parts.append(np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32))
                continue
            parts += [self._recording(syllable), np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)]
        if not parts:
            raise TTSError(f"{self.name} has nothing to read in {text!r}")
        x = np.concatenate(parts)
        n = int(round(x.size / speed))
        return np.interp(np.linspace(0.0, x.size - 1.0, n), np.arange(x.size), x).astype(np.float32), SAMPLE_RATE

    def _recording(self, syllable: str) -> np.ndarray:
        base, tone = syllable.rstrip("ˊˇˋ˙"), syllable[len(syllable.rstrip("ˊˇˋ˙")):]
        for folder in (base + TONE_DIGITS.get(tone, ""), base):  # a neutral tone not recorded: the first tone
            path = OGG / folder / self.file
            if path.is_file():
                return _trimmed(path)
        raise TTSError(f"{self.name} has no recording of the syllable {syllable}")


def syllables(text: str) -> list:
    """Zhuyin syllables with tone marks; None for a pause (punctuation). TTSError for what is not Chinese."""
    import cn2an
    from pypinyin import Style, lazy_pinyin

    out = []
    for piece in lazy_pinyin(cn2an.transform(text, "an2cn"), style=Style.BOPOMOFO, errors=lambda s: [f"\0{s}"]):
        if not piece.startswith("\0"):
            out.append(piece)
        elif PUNCTUATION.fullmatch(piece[1:]):
            out.append(None)
        else:
            raise TTSError(f"gcin reads Chinese only, not {piece[1:]!r}")
    return out


@functools.lru_cache(maxsize=4096)
def _trimmed(path: Path) -> np.ndarray:
    import soundfile

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise TTSError(f"{path} is {rate} Hz, not {SAMPLE_RATE}")
    x = samples.mean(axis=1)
    loud = np.flatnonzero(np.abs(x) > EDGE * max(float(np.abs(x).max()), 1e-9))
    return x[loud[0]:loud[-1] + 1] if loud.size else x[:0]
