"""Voices that are Debian programs, run once per sentence into a temporary WAV file.

    flite     flite 2.2 (Debian main): kal (8 kHz), kal16, awb, rms, slt; speed -> duration_stretch
    rhvoice   RHVoice-test (Debian non-free: rhvoice rhvoice-english): alan, bdl, clb, slt (24 kHz); speed -> rate %
    festival  text2wave (Debian main) with the festvox voices kal_diphone, ked_diphone (festvox-kdlpc16k) and
              cmu_us_slt_arctic_hts; speed -> Duration_Stretch. Held out: evaluation sets only

Each checks at load time that its voice is installed: flite and RHVoice fall back to another voice without a word.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from .base import TTSError, need_program, run_program
from .catalog import HINTS, Voice

RHVOICE_VOICES = Path("/usr/share/RHVoice/voices")
FESTIVAL_VOICES = {"kal": "kal_diphone", "ked": "ked_diphone", "slt-hts": "cmu_us_slt_arctic_hts"}
FESTIVAL_DIRS = [Path("/usr/share/festival/voices") / d for d in ("english", "us")]


class FliteEngine:
    def __init__(self, voice: Voice):
        self.program = need_program("flite", HINTS["flite"])
        listed = subprocess.run([self.program, "-lv"], capture_output=True, text=True, timeout=30).stdout
        if voice.voice not in listed.split():
            raise TTSError(f"flite has no voice {voice.voice!r} ({listed.strip()}): {HINTS['flite']}")
        self.voice, self.name, self.lang = voice.voice, voice.name, voice.lang

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        return run_program([self.program, "-voice", self.voice, "--setf", f"duration_stretch={1.0 / speed:.4f}",
                            "-t", text, "-o", "{wav}"], None, self.name)


class RHVoiceEngine:
    def __init__(self, voice: Voice):
        self.program = need_program("RHVoice-test", HINTS["rhvoice"])
        if not (RHVOICE_VOICES / voice.voice).is_dir():
            raise TTSError(f"RHVoice has no voice {voice.voice!r} in {RHVOICE_VOICES}: {HINTS['rhvoice']}")
        self.voice, self.name, self.lang = voice.voice, voice.name, voice.lang

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        return run_program([self.program, "-p", self.voice, "-r", str(int(round(100 * speed))), "-o", "{wav}"],
                           text, self.name)


class FestivalEngine:
    def __init__(self, voice: Voice):
        self.program = need_program("text2wave", HINTS["festival"])
        self.festvox = FESTIVAL_VOICES[voice.voice]
        if not any((d / self.festvox).is_dir() for d in FESTIVAL_DIRS):
            raise TTSError(f"festival has no voice {self.festvox} in {', '.join(map(str, FESTIVAL_DIRS))}: "
                           f"{HINTS['festival']}")
        self.name, self.lang = voice.name, voice.lang

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        return run_program([self.program, "-eval", f"(voice_{self.festvox})",
                            "-eval", f"(Parameter.set 'Duration_Stretch {1.0 / speed:.4f})", "-o", "{wav}"],
                           text, self.name)
