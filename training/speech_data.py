"""Offline speech-instruction data: packaged text -> TTS clips -> ASR and conversation manifests (see data.py).

    sentences   what is spoken and on which side of the split (sentences.py: questions, packaged texts chosen to
                cover vocabulary, and ASR-only sentences derived from the others)
    clips       one clip per question: clips/<lang>-<id>.wav, 16 kHz mono; the id hashes voice, text and variation,
                so an existing file is a finished clip and a rerun skips it
    manifests   asr.jsonl + conv.jsonl (train), asr.heldout.jsonl + conv.heldout.jsonl (and .dev.), dataset.json,
                README.md

Conversation rows cycle through four kinds: the spoken question alone; spoken question + a text instruction; a text
instruction about spoken content (repeat it); the question as text only. Answers come from the corpus, or from an
`answer(question) -> str` callback (an LLM) whose results are cached in answers.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.audio import MIN_SAMPLES, SAMPLE_RATE
from . import texts
from .sentences import (DEFAULT_SOURCES, SOURCES, DataBuildError, Sentence, answer_texts, read_vocab,
                        remix_texts, sentences, split_of, stable_int, vocab_texts, word_texts)
from . import augment
from .augment import Variation, render
from .voices import Engine, check_training, make_engine, parse

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LANGS = ("en", "zh")
RESPONSES = ("corpus", "llm")
DEFAULT_VOICES = {"en": "piper", "zh": "kokoro:jf_alpha"}
KINDS = ("speech", "speech+instruction", "instruction+speech", "text")
MAX_CLIP_S = 30.0  # one Whisper window
ANSWER_INSTRUCTIONS = {
    "en": ["Answer the question in the audio.", "Listen and reply briefly.", "Respond to what you hear."],
    "zh": ["回答音频里的问题。", "听一听，然后简短地回答。", "请回应你听到的内容。"],
}
REPEAT_INSTRUCTIONS = {
    "en": ["Repeat what the speaker said.", "Write down the speaker's words.", "What did the speaker say?"],
    "zh": ["重复说话人说的话。", "写下你听到的内容。", "说话人说了什么？"],
}

QA_SOURCES = ("math", "facts", "chatterbot/trivia", "chatterbot/science", "chatterbot/history")
QA_MAX_WORDS = 4  # longer reference answers cannot be matched inside a free-form reply


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    langs: tuple = LANGS
    limit: int | None = None  # spoken sentences per language; None = all
    seed: int = 0
    noise: bool = False  # coloured noise at 5-20 dB SNR on most clips
    augment: bool = False  # formant shift, room reverberation, telephone band (augment.py)
    responses: str = "corpus"
    engines: tuple = ()  # (lang, voice name) pairs overriding DEFAULT_VOICES
    heldout_fraction: float = 0.1
    dev_fraction: float = 0.0  # sentences to choose checkpoints by (keep_best), apart from the held-out ones
    sources: tuple = DEFAULT_SOURCES
    math_count: int = 200  # arithmetic questions generated per language
    max_chars: int = 200  # longer questions are not spoken
    remix_count: int = 1000  # remixed sentences per language, with the "remix" source
    words_count: int = 1000  # word lists per language, with the "words" source
    vocab: str | None = None  # word list of the "vocab" source: one word per line, most useful first
    vocab_count: int = 500  # new words per language the "vocab" source writes sentences around

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "langs", tuple(self.langs))
        object.__setattr__(self, "engines", tuple(tuple(e) for e in self.engines))
        object.__setattr__(self, "sources", tuple(self.sources))
        bad = [lang for lang in self.langs if lang not in LANGS] or ([] if self.langs else ["(none)"])
        if bad:
            raise ValueError(f"langs must be among {LANGS}, got {bad}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        bad = [s for s in self.sources if s not in SOURCES] or ([] if self.sources else ["(none)"])
        if bad:
            raise ValueError(f"sources must be among {SOURCES}, got {bad}")
        unspoken = [s for s in self.sources if s in texts.SOURCES and texts.SOURCES[s] not in self.langs]
        if unspoken:
            raise ValueError(f"text source {unspoken[0]} is {texts.SOURCES[unspoken[0]]!r}, which langs "
                             f"{self.langs} leaves out")
        if self.responses not in RESPONSES:
            raise ValueError(f"responses must be one of {RESPONSES}, got {self.responses!r}")
        if "answers" in self.sources and self.responses != "llm":
            raise ValueError("the 'answers' source speaks the LLM's cached answers: it needs responses 'llm'")
        for lang, voice in self.engines:
            check_training(parse(voice, lang))  # a held-out voice, or an unknown one, fails here
        if self.remix_count < 1 or self.words_count < 1:
            raise ValueError(f"remix_count and words_count must be >= 1, got {self.remix_count}, {self.words_count}")
        if "vocab" in self.sources and (self.responses != "llm" or not self.vocab or self.vocab_count < 1):
            raise ValueError("the 'vocab' source has the LLM write sentences around the words of a word list: it "
                             "needs responses 'llm', a vocab file and vocab_count >= 1")
        if not (0.0 <= self.heldout_fraction and 0.0 <= self.dev_fraction
                and self.heldout_fraction + self.dev_fraction < 1.0):
            raise ValueError(f"heldout_fraction and dev_fraction must be >= 0 with a sum below 1, got "
                             f"{self.heldout_fraction} and {self.dev_fraction}")

    def engine_for(self, lang: str) -> str:
        return dict(self.engines).get(lang, DEFAULT_VOICES[lang])

    @property
    def splits(self) -> tuple:
        return ("train", "dev", "heldout") if self.dev_fraction else ("train", "heldout")

    def split(self, text: str) -> str:
        return split_of(text, self.heldout_fraction, self.dev_fraction)


@dataclass
class BuildSummary:
    out: Path
    rows: Counter = field(default_factory=Counter)  # (split, lang, "asr"|"conv") -> rows
    clips_written: int = 0
    clips_reused: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> sentences left out
    answers_computed: int = 0
    answers_cached: int = 0
    vocab_computed: int = 0  # the vocab source's LLM replies
    vocab_cached: int = 0
    audio_seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"{split:8s} {lang}  asr {self.rows[split, lang, 'asr']:6d}  conv {self.rows[split, lang, 'conv']:6d}"
               for split, lang in sorted({k[:2] for k in self.rows})]
        out.append(f"clips: {self.clips_written} written, {self.clips_reused} already there, "
                   f"{self.audio_seconds / 60:.1f} min of audio")
        if self.answers_computed or self.answers_cached:
            out.append(f"answers: {self.answers_computed} computed, {self.answers_cached} from the cache")
        if self.vocab_computed or self.vocab_cached:
            out.append(f"vocab replies: {self.vocab_computed} computed, {self.vocab_cached} from the cache")
        out.append(f"skipped: {self.n_skipped}" + (f" ({dict(self.skipped)})" if self.skipped else ""))
        return out


# ---- answers -----------------------------------------------------------------------------------------------------

class AnswerCache:
    """answers.jsonl: one {"lang", "question", "answer"} per line, appended as answers are computed."""

    def __init__(self, path: Path, answer: Callable[[str], str]):
        self.path, self.answer, self.computed, self.cached = path, answer, 0, 0
        self.known: dict[tuple, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.known[(row["lang"], row["question"])] = row["answer"]

    def __call__(self, lang: str, question: str) -> str:
        if (lang, question) in self.known:
            self.cached += 1
            return self.known[(lang, question)]
        text = str(self.answer(question)).strip()
        if not text:
            raise ValueError("the answer callback returned an empty answer")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"lang": lang, "question": question, "answer": text}, ensure_ascii=False) + "\n")
        self.known[(lang, question)] = text
        self.computed += 1
        return text


# ---- rows --------------------------------------------------------------------------------------------------------

def conversation(kind: str, s: Sentence, clip: str, answer: str, rng: random.Random) -> list[dict]:
    if kind == "speech":
        user = [{"audio": clip}]
    elif kind == "speech+instruction":
        user = [{"text": rng.choice(ANSWER_INSTRUCTIONS[s.lang])}, {"audio": clip}]
    elif kind == "instruction+speech":
        user, answer = [{"text": rng.choice(REPEAT_INSTRUCTIONS[s.lang])}, {"audio": clip}], s.text
    else:
        user = s.text
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _write_clip(path: Path, samples: np.ndarray) -> None:
    import soundfile

    tmp = path.with_name(path.name + ".part")
    soundfile.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)  # a clip file exists only once it is complete


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def build(config: BuildConfig, answer: Callable[[str], str] | None = None,
          engines: dict[str, Engine] | None = None, progress: bool = True) -> BuildSummary:
    """Build (or finish building) the data set in config.out; clips that already exist are kept, not respoken."""
    import soundfile
    from tqdm import tqdm

    if config.responses == "llm" and answer is None:
        raise DataBuildError("responses 'llm' needs an answer(question) -> str callback")
    if "vocab" in config.sources:
        read_vocab(config.vocab)  # a bad word list fails now, not after the questions are spoken
    out = config.out
    engines = dict(engines or {})
    for lang in config.langs:
        if lang not in engines:
            engines[lang] = make_engine(lang, config.engine_for(lang))
    (out / "clips").mkdir(parents=True, exist_ok=True)
    answers = AnswerCache(out / "answers.jsonl", answer) if config.responses == "llm" else None
    summary = BuildSummary(out)
    plan = [(j, s) for lang in config.langs for j, s in enumerate(sentences(lang, config))]
    manifests: dict[str, dict[str, list]] = {split: {"asr": [], "conv": [], "qa": []} for split in config.splits}

    def speak(s: Sentence) -> tuple[str, dict] | None:
        """The sentence's clip (spoken now, or found from an earlier run) and its manifest metadata; None if the
        voice failed or the clip is out of bounds (counted in the summary)."""
        rng = np.random.default_rng([config.seed, stable_int("clip", s.lang, s.key)])
        voice = engines[s.lang].name
        variation = Variation.sample(rng, config.noise, config.augment)
        clip_id = hashlib.sha1(json.dumps([voice, s.text, variation.to_dict()]).encode("utf-8")).hexdigest()[:16]
        clip = f"clips/{s.lang}-{clip_id}.wav"
        path = out / clip
        if path.is_file():
            summary.clips_reused += 1
        else:
            try:
                samples = render(engines[s.lang], s.text, variation)
            except Exception as e:  # any engine failure (onnxruntime, espeak, a callback) skips only this sample
                summary.skipped["tts failed"] += 1
                log.warning("skipped %r: %s", s.text, str(e).splitlines()[0] if str(e) else type(e).__name__)
                return None
            if samples.size < MIN_SAMPLES or samples.size > MAX_CLIP_S * SAMPLE_RATE:
                summary.skipped["too short" if samples.size < MIN_SAMPLES else "too long"] += 1
                return None
            _write_clip(path, samples)
            summary.clips_written += 1
        seconds = soundfile.info(str(path)).duration
        summary.audio_seconds += seconds
        return clip, {"voice": voice, "variation": variation.to_dict(), "seconds": round(seconds, 3)}

    for j, s in tqdm(plan, desc="speech data", unit="clip", disable=not progress):
        pick = random.Random(stable_int("pick", s.lang, s.key, config.seed))
        spoken = speak(s)
        if spoken is None:
            continue
        clip, audio_meta = spoken
        kind = KINDS[j % len(KINDS)]  # j counts this language's sentences: kinds stay put when limit grows
        if not s.answers and not answers:  # a packaged text has no reference answer: the repeat task needs none
            kind = "instruction+speech"
        try:
            reply = answers(s.lang, s.text) if answers and kind != "instruction+speech" else \
                pick.choice(s.answers) if s.answers else s.text
        except Exception as e:  # the callback is user code (an LLM); a failure drops this sentence only
            summary.skipped["answer failed"] += 1
            log.warning("no answer for %r: %s", s.text, e)
            continue
        split = config.split(s.text)
        meta = {"lang": s.lang, "source": s.source, "split": split}
        manifests[split]["asr"].append({"audio": clip, "text": s.text, **meta, **audio_meta})
        turns = conversation(kind, s, clip, reply, pick)
        audio_meta = audio_meta if kind != "text" else {}
        manifests[split]["conv"].append({"turns": turns, "kind": kind, **meta, **audio_meta})
        short = [a for a in s.answers if 0 < len(a.split()) <= QA_MAX_WORDS]
        if s.source in QA_SOURCES and short:  # questions with a short checkable answer: spoken-QA evaluation
            manifests[split]["qa"].append({"audio": clip, "question": s.text, "answers": short, **meta})

    spoken_keys = {s.key for _, s in plan}
    extra = []
    if "answers" in config.sources:  # after the questions, so that this run's own answers are in the cache
        extra += [s for lang in config.langs for s in answer_texts(lang, answers.known, config, spoken_keys)]
    makers = [make for name, make in (("remix", remix_texts), ("words", word_texts)) if name in config.sources]
    if "vocab" in config.sources:  # the LLM's sentences are cached apart from its answers to questions
        writer = AnswerCache(out / "vocab.jsonl", answer)
        makers.append(lambda lang, pool, config, spoken: vocab_texts(lang, pool, config, spoken, writer))
    for lang in config.langs if makers else ():  # their pool: every training question, and the cached answers
        pool = [s.text for s in sentences(lang, replace(config, sources=DEFAULT_SOURCES, limit=None))]
        pool += [s.text for s in answer_texts(lang, answers.known, config, spoken_keys)] if answers else []
        for make in makers:
            extra += make(lang, pool, config, spoken_keys | {s.key for s in extra})
    if extra:
        for s in tqdm(extra, desc="extra ASR sentences", unit="clip", disable=not progress):
            spoken = speak(s)
            if spoken is not None:
                clip, audio_meta = spoken
                split = config.split(s.text)  # only vocab sentences can be held out (or dev)
                manifests[split]["asr"].append({"audio": clip, "text": s.text, "lang": s.lang, "source": s.source,
                                                "split": split, **audio_meta})

    for split, names in manifests.items():
        for name, rows in names.items():
            _write_jsonl(out / (f"{name}.jsonl" if split == "train" else f"{name}.{split}.jsonl"), rows)
            for r in rows:
                summary.rows[(split, r["lang"], name)] += 1
    for name in () if config.dev_fraction else ("asr", "conv", "qa"):  # an earlier build's dev rows now train
        (out / f"{name}.dev.jsonl").unlink(missing_ok=True)
    if answers:
        summary.answers_computed, summary.answers_cached = answers.computed, answers.cached
    if "vocab" in config.sources:
        summary.vocab_computed, summary.vocab_cached = writer.computed, writer.cached
    _write_metadata(config, engines, summary)
    return summary


def _write_metadata(config: BuildConfig, engines: dict[str, Engine], summary: BuildSummary) -> None:
    voices = {lang: engines[lang].name for lang in config.langs}
    dev = (f"; dev (to choose checkpoints by, never to report): the next {config.dev_fraction} of the hash range"
           if config.dev_fraction else "")
    heldout = (f"by sentence: sha1 of the normalized question < {config.heldout_fraction}{dev}; no sentence is on "
               "two sides. Each language has one voice, so no voice is held out: held-out clips use the training voice "
               f"and the same variation ranges ({augment.describe(config.noise, config.augment)})")
    meta = {
        "format": "llasm.speech_data", "version": FORMAT_VERSION,
        "config": {**asdict(config), "out": str(config.out), "engines": dict(config.engines)},
        "voices": voices, "heldout": heldout,
        "manifests": {split: [f"asr{suffix}.jsonl", f"conv{suffix}.jsonl"]
                      for split in config.splits for suffix in ["" if split == "train" else f".{split}"]},
        "rows": {"/".join(k): v for k, v in sorted(summary.rows.items())},
        "skipped": dict(summary.skipped), "audio_seconds": round(summary.audio_seconds, 1),
    }
    (config.out / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    readme = [
        "# Synthetic speech data (llasm-data build)", "",
        "- `asr.jsonl`, `conv.jsonl`: training manifests; `asr.heldout.jsonl`, `conv.heldout.jsonl`: held out"
        + ("; `asr.dev.jsonl`, `conv.dev.jsonl`: dev, to choose checkpoints by." if config.dev_fraction else "."),
        "- Clips: `clips/<lang>-<id>.wav`, 16 kHz mono; each row records its voice and variation.",
        f"- Voices: {', '.join(f'{k}: {v}' for k, v in voices.items())}.",
        f"- Held out {heldout}.",
        f"- Responses: {config.responses}" + (" (cached in answers.jsonl)." if config.responses == "llm" else "."),
        f"- Texts: {', '.join(config.sources)} (chatterbot = chatterbot-corpus Q/A; math = templated arithmetic; "
        f"answers = complete sentences of the cached LLM answers to training questions, ASR rows only; remix = the "
        f"start of one training sentence and the end of another, ASR rows only; words = training words in random "
        f"order, ASR rows only; vocab = the LLM's sentences around words of the --vocab list that no training text "
        f"has, ASR rows only, some held out)" + (f"; vocab list: {config.vocab}." if config.vocab else "."), "",
    ]
    (config.out / "README.md").write_text("\n".join(readme), encoding="utf-8")
