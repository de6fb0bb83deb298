"""Offline speech-instruction data: packaged text -> TTS clips -> ASR and conversation manifests (see data.py).

    sentences   what is spoken and on which side of the split (sentences.py: questions, packaged texts chosen to
                cover vocabulary, and ASR-only sentences derived from the others)
    voices      each sentence in voices_per_sentence voices drawn from the language's training voices (default:
                voices.catalog.TRAINING); held-out voices speak the held-out sentences only, into their own
                manifests (heldout-voice), and no training row has them
    clips       clips/<lang>-<id>.wav, 16 kHz mono, each with its own variation (augment.py); the id hashes voice,
                text and variation, so an existing file is a finished clip and a rerun skips it
    shards      shard (i, n) speaks only the sentences whose hash falls to part i: n machines build at once and
                `manifests.merge` joins their directories into what one build would have made
    manifests   asr / conv / qa rows per split (manifests.py), dataset.json, README.md

Conversation rows (the first voice's clip) cycle through four kinds (conversations.py): the audio alone, the audio
then typed text, typed text then the audio (a repeat, or a task about a spoken statement), text alone. Answers come
from the corpus, or from an `answer(question) -> str` callback (an LLM) whose results are cached in answers.jsonl. A
voice that cannot load, or a sentence it cannot speak, is skipped and counted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.audio import MIN_SAMPLES, SAMPLE_RATE
from . import augment, manifests, texts
from .augment import Variation, render
from .conversations import KINDS, QA_MAX_WORDS, QA_SOURCES, Ask, AnswerCache, ask, conversation
from .sentences import (DEFAULT_SOURCES, SOURCES, DataBuildError, Sentence, derived, read_vocab, sentences, split_of,
                        stable_int)
from .voices import Engine, TTSError, catalog, check_training, make_engine, parse

log = logging.getLogger(__name__)

LANGS = ("en", "zh")
RESPONSES = ("corpus", "llm")
MAX_CLIP_S = 30.0  # one Whisper window


def _pairs(pairs, what: str) -> tuple:
    """(lang, voice) pairs with canonical voice names."""
    out = []
    for lang, voice in pairs:
        if lang not in LANGS:
            raise ValueError(f"{what} names language {lang!r}; languages: {LANGS}")
        out.append((lang, parse(voice, lang).name))
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    langs: tuple = LANGS
    limit: int | None = None  # spoken sentences per language; None = all
    seed: int = 0
    noise: bool = False  # coloured noise at 5-20 dB SNR on most clips
    augment: bool = False  # formant shift, room reverberation, telephone band (augment.py)
    responses: str = "corpus"
    voices: tuple = ()  # (lang, voice) training voices; a language with none takes voices.catalog.TRAINING
    voices_per_sentence: int = 1  # 1 or 2 training voices speak each sentence
    heldout_voices: tuple = ()  # (lang, voice): held out by voice (training-list voices set aside, or evaluation
    #                             voices such as festival:kal); they speak the held-out sentences only
    heldout_fraction: float = 0.1
    dev_fraction: float = 0.0  # sentences to choose checkpoints by (keep_best), apart from the held-out ones
    shard: tuple | None = None  # (i, n): build part i of n
    sources: tuple = DEFAULT_SOURCES
    math_count: int = 200  # arithmetic questions generated per language
    max_chars: int = 200  # longer questions are not spoken
    remix_count: int = 1000  # remixed sentences per language, with the "remix" source
    words_count: int = 1000  # word lists per language, with the "words" source
    vocab: str | None = None  # word list of the "vocab" source: one word per line, most useful first
    vocab_count: int = 500  # new words per language the "vocab" source writes sentences around
    heldout_only: bool = False  # an evaluation set: the held-out sentences alone, in every voice; nothing to train on

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "langs", tuple(self.langs))
        object.__setattr__(self, "sources", tuple(self.sources))
        bad = [lang for lang in self.langs if lang not in LANGS] or ([] if self.langs else ["(none)"])
        if bad:
            raise ValueError(f"langs must be among {LANGS}, got {bad}")
        object.__setattr__(self, "heldout_voices", _pairs(self.heldout_voices, "heldout_voices"))
        object.__setattr__(self, "voices", _pairs(self.voices, "voices"))
        for lang, name in self.voices:
            check_training(parse(name, lang))  # a held-out voice never trains
        both = set(self.voices) & set(self.heldout_voices)
        if both:
            raise ValueError(f"voice {sorted(both)[0][1]} is both a training voice and held out ({sorted(both)[0][0]})")
        if self.voices_per_sentence not in (1, 2):
            raise ValueError(f"voices_per_sentence must be 1 or 2, got {self.voices_per_sentence}")
        if self.shard is not None:
            i, n = self.shard
            object.__setattr__(self, "shard", (int(i), int(n)))
            if not 0 <= i < n:
                raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
            late = [s for s in self.sources if s in ("answers", "vocab")
                    or (s in ("remix", "words") and self.responses == "llm")]
            if late:
                raise ValueError(f"a shard builds sources that are fixed before any LLM answer; {late[0]!r} is not "
                                 "(build it after merging, in a directory of its own with the merged answers.jsonl)")
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
        if self.remix_count < 1 or self.words_count < 1:
            raise ValueError(f"remix_count and words_count must be >= 1, got {self.remix_count}, {self.words_count}")
        if "vocab" in self.sources and (self.responses != "llm" or not self.vocab or self.vocab_count < 1):
            raise ValueError("the 'vocab' source has the LLM write sentences around the words of a word list: it "
                             "needs responses 'llm', a vocab file and vocab_count >= 1")
        if not (0.0 <= self.heldout_fraction and 0.0 <= self.dev_fraction
                and self.heldout_fraction + self.dev_fraction < 1.0):
            raise ValueError(f"heldout_fraction and dev_fraction must be >= 0 with a sum below 1, got "
                             f"{self.heldout_fraction} and {self.dev_fraction}")

    def training_voices(self, lang: str) -> tuple:
        """The language's training voices: those given, else the catalogue's training list less held-out ones."""
        given = tuple(v for lang_, v in self.voices if lang_ == lang)
        held = {v for lang_, v in self.heldout_voices if lang_ == lang}
        return given or tuple(v for v in catalog.TRAINING[lang] if v not in held)

    def heldout_voices_for(self, lang: str) -> tuple:
        return tuple(v for lang_, v in self.heldout_voices if lang_ == lang)

    @property
    def splits(self) -> tuple:
        return ("train",) + (("dev",) if self.dev_fraction else ()) + ("heldout",) + (
            ("heldout-voice",) if self.heldout_voices else ())

    def split(self, text: str) -> str:
        return split_of(text, self.heldout_fraction, self.dev_fraction)

    def in_shard(self, s: Sentence) -> bool:
        return self.shard is None or stable_int("shard", s.lang, s.key) % self.shard[1] == self.shard[0]

    def spoken(self, s: Sentence) -> bool:
        """Whether this build speaks the sentence: its shard's, and only the held-out ones for heldout_only."""
        return self.in_shard(s) and (not self.heldout_only or self.split(s.text) == "heldout")


@dataclass
class VoiceStats:
    clips: int = 0  # written now
    wall_s: float = 0.0  # spent speaking and rendering them
    audio_s: float = 0.0  # their length


@dataclass
class BuildSummary:
    out: Path
    rows: Counter = field(default_factory=Counter)  # (split, lang, "asr"|"conv"|"qa") -> rows
    clips_written: int = 0
    clips_reused: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> clips or sentences left out
    by_voice: dict = field(default_factory=dict)  # voice -> VoiceStats of the clips written now
    answers_computed: int = 0
    answers_cached: int = 0
    vocab_computed: int = 0  # the vocab source's LLM replies
    vocab_cached: int = 0
    audio_seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"{split:13s} {lang}  asr {self.rows[split, lang, 'asr']:6d}  conv {self.rows[split, lang, 'conv']:6d}"
               for split, lang in sorted({k[:2] for k in self.rows})]
        out.append(f"clips: {self.clips_written} written, {self.clips_reused} already there, "
                   f"{self.audio_seconds / 60:.1f} min of audio")
        for voice, st in sorted(self.by_voice.items()):
            out.append(f"  {voice:36s} {st.clips:6d} clips written, {st.wall_s:8.1f} s "
                       f"({1000 * st.wall_s / max(st.clips, 1) / 60:.1f} min per 1k clips)")
        if self.answers_computed or self.answers_cached:
            out.append(f"answers: {self.answers_computed} computed, {self.answers_cached} from the cache")
        if self.vocab_computed or self.vocab_cached:
            out.append(f"vocab replies: {self.vocab_computed} computed, {self.vocab_cached} from the cache")
        out.append(f"skipped: {self.n_skipped}" + (f" ({dict(self.skipped)})" if self.skipped else ""))
        return out


class VoicePool:
    """A build's engines, made on first use. A voice that cannot load fails once (logged); its clips are skipped.
    `fixed`: per language, one engine that speaks all of its training sentences instead of the configured voices."""

    def __init__(self, make: Callable[[str, str], Engine], fixed: dict[str, Engine]):
        self.make, self.fixed = make, fixed
        self.engines: dict[tuple, Engine] = {}
        self.broken: dict[tuple, str] = {}

    def training(self, lang: str, config: BuildConfig) -> tuple:
        return (self.fixed[lang].name,) if lang in self.fixed else config.training_voices(lang)

    def get(self, lang: str, name: str) -> Engine:
        if lang in self.fixed and name == self.fixed[lang].name:
            return self.fixed[lang]
        key = (lang, name)
        if key in self.broken:
            raise TTSError(self.broken[key])
        if key not in self.engines:
            try:
                self.engines[key] = self.make(lang, name)
            except Exception as e:  # a missing package, program or model: this voice only
                self.broken[key] = f"voice {name} ({lang}) is unavailable: {str(e).splitlines()[0] if str(e) else e!r}"
                log.warning("%s; its clips are skipped", self.broken[key])
                raise TTSError(self.broken[key]) from None
        return self.engines[key]


@dataclass(frozen=True)
class Job:
    """One clip to make: a sentence in a voice. role: "first" (ASR, conversation and QA rows), "second" (a second
    training voice: ASR row) or "heldout-voice" (the held-out sentence in a held-out voice: its own manifests)."""

    sentence: Sentence
    voice: str
    role: str
    j: int  # the sentence's place among its language's sentences (conversation kinds cycle by it); -1: ASR only


def plan(numbered: list[tuple[int, Sentence]], config: BuildConfig, pool: VoicePool) -> list[Job]:
    jobs = []
    for j, s in numbered:
        names = sorted(pool.training(s.lang, config))
        rng = random.Random(stable_int("voices", s.lang, s.key, config.seed))
        chosen = rng.sample(names, min(config.voices_per_sentence, len(names)))
        jobs += [Job(s, v, "first" if k == 0 else "second", j) for k, v in enumerate(chosen)]
        if config.split(s.text) == "heldout":
            jobs += [Job(s, v, "heldout-voice", j) for v in config.heldout_voices_for(s.lang)]
    return jobs


def _ask(job: Job, config: BuildConfig) -> Ask | None:
    """The conversation turn of a sentence's first clip (None: the job has no conversation row). Its kind cycles with
    j, which counts its language's sentences, so kinds stay put when the limit grows; its choices are seeded by the
    sentence. add_rows writes it, and AnswerCache.prefetch answers its question beforehand."""
    if job.role == "second" or job.j < 0:
        return None
    s = job.sentence
    pick = random.Random(stable_int("pick", s.lang, s.key, config.seed))
    return ask(KINDS[job.j % len(KINDS)], s, config.responses == "llm", pick)


def _digest(jobs: list[Job]) -> str:
    items = [[job.sentence.lang, job.sentence.text, job.voice, job.role] for job in jobs]
    return hashlib.sha1(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def _write_clip(path: Path, samples: np.ndarray) -> None:
    import soundfile

    tmp = path.with_name(path.name + ".part")
    soundfile.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)  # a clip file exists only once it is complete


PART_FILE = "part.txt"  # which part of a build a directory holds ("2/4" or "whole"), written as its build starts


def _claim(out: Path, shard: tuple | None) -> None:
    """Refuse a directory that holds, or is building, another part of a build: two parts in one directory would
    share its clips, but each would write its manifests over the other's."""
    part = f"{shard[0]}/{shard[1]}" if shard else "whole"
    mark = out / PART_FILE
    held = mark.read_text(encoding="utf-8").strip() if mark.is_file() else None
    if held is None and (out / "dataset.json").is_file():  # built before the mark was written
        try:
            s = manifests.read_dataset(out).get("shard")
            held = f"{s[0]}/{s[1]}" if s else "whole"
        except (ValueError, TypeError, IndexError):
            held = None
    if held is not None and held != part:
        raise DataBuildError(f"{out} holds {_part_name(held)}, not {_part_name(part)}: give each part of a build a "
                             "directory of its own and join them with llasm-data merge")
    mark.write_text(part + "\n", encoding="utf-8")


def _part_name(part: str) -> str:
    return "an unsharded build" if part == "whole" else f"shard {part}"


def build(config: BuildConfig, answer: Callable[[str], str] | None = None,
          engines: dict[str, Engine] | None = None, progress: bool = True,
          make: Callable[[str, str], Engine] = make_engine,
          answer_many: tuple[Callable[[list[str]], list[str]], int] | None = None) -> BuildSummary:
    """Build (or finish building) the data set, or config.shard's part of it, in config.out; clips that already
    exist are kept, not respoken. `engines`: per language, one engine for all its training sentences (tests);
    `make(lang, voice)` makes the others. answer_many: (many(questions) -> answers, group size): the LLM answers
    the build needs are computed first, that many at once (an LLM decoding several sequences together)."""
    import soundfile
    from tqdm import tqdm

    if config.responses == "llm" and answer is None:
        raise DataBuildError("responses 'llm' needs an answer(question) -> str callback")
    if "vocab" in config.sources:
        read_vocab(config.vocab)  # a bad word list fails now, not after the questions are spoken
    out = config.out
    (out / "clips").mkdir(parents=True, exist_ok=True)
    _claim(out, config.shard)
    pool = VoicePool(make, dict(engines or {}))
    answers = AnswerCache(out / "answers.jsonl", answer) if config.responses == "llm" else None
    summary = BuildSummary(out)
    numbered = [(j, s) for lang in config.langs for j, s in enumerate(sentences(lang, config))]
    jobs = plan(numbered, config, pool)
    digests = [_digest(jobs)]
    if answers and answer_many:
        asks = [(job.sentence.lang, _ask(job, config)) for job in jobs if config.spoken(job.sentence)]
        answers.prefetch([(lang, a.question) for lang, a in asks if a and a.question], *answer_many, progress=progress)
    rows: dict[str, dict[str, list]] = {split: {name: [] for name in manifests.NAMES} for split in config.splits}
    shard = f" {config.shard[0]}/{config.shard[1]}" if config.shard else ""

    def speak(job: Job) -> tuple[str, dict] | None:
        """The job's clip (spoken now, or found from an earlier run) and its row metadata; None if the voice failed
        or the clip is out of bounds (counted in the summary)."""
        s = job.sentence
        rng = np.random.default_rng([config.seed, stable_int("clip", s.lang, s.key, job.voice)])
        variation = Variation.sample(rng, config.noise, config.augment)
        clip_id = hashlib.sha1(json.dumps([job.voice, s.text, variation.to_dict()]).encode("utf-8")).hexdigest()[:16]
        clip = f"clips/{s.lang}-{clip_id}.wav"
        path = out / clip
        if path.is_file():
            summary.clips_reused += 1
        else:
            try:
                engine = pool.get(s.lang, job.voice)
            except TTSError:
                summary.skipped["voice unavailable"] += 1
                return None
            start = time.perf_counter()
            try:
                samples = render(engine, s.text, variation)
            except Exception as e:  # any engine failure (onnxruntime, a program, a callback) skips only this clip
                summary.skipped["tts failed"] += 1
                log.warning("skipped %r (%s): %s", s.text, job.voice, str(e).splitlines()[0] if str(e) else repr(e))
                return None
            if samples.size < MIN_SAMPLES or samples.size > MAX_CLIP_S * SAMPLE_RATE:
                summary.skipped["too short" if samples.size < MIN_SAMPLES else "too long"] += 1
                return None
            _write_clip(path, samples)
            stats = summary.by_voice.setdefault(job.voice, VoiceStats())
            stats.clips, stats.wall_s = stats.clips + 1, stats.wall_s + time.perf_counter() - start
            stats.audio_s += samples.size / SAMPLE_RATE
            summary.clips_written += 1
        seconds = soundfile.info(str(path)).duration
        summary.audio_seconds += seconds
        return clip, {"voice": job.voice, "variation": variation.to_dict(), "seconds": round(seconds, 3)}

    def add_rows(job: Job, clip: str, audio_meta: dict) -> None:
        s = job.sentence
        split = config.split(s.text)
        meta = {"lang": s.lang, "source": s.source, "split": split}
        into = rows["heldout-voice" if job.role == "heldout-voice" else split]
        into["asr"].append({"audio": clip, "text": s.text, **meta, **audio_meta})
        a = _ask(job, config)
        if a is None:
            return
        try:
            reply = s.text if a.question is None else answers(s.lang, a.question) if answers else \
                random.Random(stable_int("answer", s.lang, s.key, config.seed)).choice(s.answers)
        except Exception as e:  # the callback is user code (an LLM); a failure drops this sentence's conversation
            summary.skipped["answer failed"] += 1
            log.warning("no answer for %r: %s", a.question, e)
            return
        into["conv"].append({"turns": conversation(a, clip, reply), "kind": a.kind, **meta,
                             **(audio_meta if a.kind != "text" else {})})
        short = [a for a in s.answers if 0 < len(a.split()) <= QA_MAX_WORDS]
        if s.source in QA_SOURCES and short:  # questions with a short checkable answer: spoken-QA evaluation
            into["qa"].append({"audio": clip, "question": s.text, "answers": short, **meta})

    def run(jobs: list[Job], desc: str) -> None:
        mine = [job for job in jobs if config.spoken(job.sentence)]
        with tqdm(mine, desc=desc + shard, unit="clip", disable=not progress) as bar:
            for job in bar:
                spoken = speak(job)
                if spoken is not None:
                    add_rows(job, *spoken)
                if summary.skipped:
                    bar.set_postfix(skipped=summary.n_skipped, refresh=False)

    run(jobs, "speech data")
    writer = AnswerCache(out / "vocab.jsonl", answer) if "vocab" in config.sources else None
    extra = derived(config, {s.key for _, s in numbered}, answers.known if answers else None, writer)
    digests.append(_digest(extra_jobs := plan([(-1, s) for s in extra], config, pool)))
    run(extra_jobs, "extra ASR sentences")
    if answers:
        summary.answers_computed, summary.answers_cached = answers.computed, answers.cached
    if writer:
        summary.vocab_computed, summary.vocab_cached = writer.computed, writer.cached
    summary.rows = manifests.write_manifests(out, rows)
    _write_metadata(config, pool, summary, "+".join(digests))
    return summary


def _write_metadata(config: BuildConfig, pool: VoicePool, summary: BuildSummary, digest: str) -> None:
    voices = {lang: list(pool.training(lang, config)) for lang in config.langs}
    held = {lang: list(config.heldout_voices_for(lang)) for lang in config.langs if config.heldout_voices_for(lang)}
    dev = (f"; dev (to choose checkpoints by, never to report): the next {config.dev_fraction} of the hash range"
           if config.dev_fraction else "")
    heldout = (f"by sentence: sha1 of the normalized sentence < {config.heldout_fraction}{dev}; no sentence is on two "
               "sides" + (f". By voice: {held}, speaking the held-out sentences only (heldout-voice manifests); no "
                          "training row has them" if held else "") + ". Every clip has the same variation ranges ("
               f"{augment.describe(config.noise, config.augment)})")
    config_dict = {**asdict(config), "out": str(config.out)}
    if not config.heldout_only:  # as before the option: the shards of a build begun then still merge
        del config_dict["heldout_only"]
    meta = {
        "config": config_dict, "voices": voices, "heldout_voices": held, "heldout": heldout,
        "shard": list(config.shard) if config.shard else None, "plan": digest,
        "manifests": {split: [manifests.manifest_name(n, split) for n in manifests.NAMES] for split in config.splits},
        "rows": {"/".join(k): v for k, v in sorted(summary.rows.items())},
        "skipped": dict(summary.skipped), "audio_seconds": round(summary.audio_seconds, 1),
    }
    readme = [
        "# Synthetic speech data (llasm-data build)", "",
        "- `asr.jsonl`, `conv.jsonl`, `qa.jsonl`: training manifests; `*.heldout.jsonl`: held-out sentences"
        + ("; `*.dev.jsonl`: dev, to choose checkpoints by" if config.dev_fraction else "")
        + ("; `*.heldout-voice.jsonl`: held-out sentences in held-out voices" if held else "") + ".",
        "- Clips: `clips/<lang>-<id>.wav`, 16 kHz mono; each row records its voice and variation (with its seed).",
        f"- Training voices ({config.voices_per_sentence} per sentence): "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in voices.items()) + ".",
        f"- Held out {heldout}.",
        f"- Responses: {config.responses}" + (" (cached in answers.jsonl)." if config.responses == "llm" else "."),
        f"- Texts: {', '.join(config.sources)} (llasm's training/sentences.py and texts.py say what each is).",
    ]
    if config.heldout_only:
        readme.append("- An evaluation set: only the held-out sentences were spoken (--heldout-only).")
    if config.shard:
        readme.append(f"- Shard {config.shard[0]}/{config.shard[1]}: merge all shards with `llasm-data merge`.")
    manifests.write_dataset(config.out, meta, readme)
