"""What every engine shares: the Engine protocol, TTSError, and running a speech program into a WAV file."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

PROGRAM_TIMEOUT_S = 120  # one sentence; a program that takes longer is stuck


class TTSError(RuntimeError):
    """A voice that cannot be loaded or cannot speak a text."""


class Engine(Protocol):
    name: str  # the voice's canonical name, recorded in manifests, e.g. "kokoro:jf_alpha+jm_kumo@0.5"
    lang: str  # the language it speaks here ("en" or "zh")

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]: ...


def need_program(program: str, hint: str) -> str:
    """The program's path, or TTSError with the install hint."""
    path = shutil.which(program)
    if path is None:
        raise TTSError(f"{program} is not installed: {hint}")
    return path


def run_program(args: list[str], text: str | None, name: str) -> tuple[np.ndarray, int]:
    """Run a speech program that writes the WAV file named by the placeholder "{wav}" in `args` (text on stdin
    unless None) and return its samples as float32 mono. Programs that exit 0 after an error (festival's "SIOD
    ERROR") or write nothing are failures too."""
    import soundfile

    with tempfile.TemporaryDirectory(prefix="llasm-tts-") as tmp:
        wav = Path(tmp) / "out.wav"
        args = [str(wav) if a == "{wav}" else a for a in args]
        try:
            done = subprocess.run(args, input=text, capture_output=True, text=True, encoding="utf-8",
                                  errors="replace", timeout=PROGRAM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TTSError(f"{name} took over {PROGRAM_TIMEOUT_S} s") from None
        err = " ".join(done.stderr.split())[:200]
        if done.returncode != 0 or "ERROR" in done.stderr:
            raise TTSError(f"{name} failed (exit {done.returncode}): {err or '(nothing on stderr)'}")
        if not wav.is_file() or wav.stat().st_size <= 44:
            raise TTSError(f"{name} wrote no audio: {err or '(nothing on stderr)'}")
        samples, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    return samples.mean(axis=1), int(rate)
