"""Evaluation of a bundle: ASR error rates and spoken-QA accuracy, one fresh conversation per item.

Manifests are JSONL, one object per line (blank lines are skipped); audio paths are relative to the manifest's
directory unless absolute. Unknown keys are ignored. "lang" is optional everywhere: "en" or "zh"; without it a row
is Chinese when its text (ASR: "text"; QA: "question" and "answers") has a CJK ideograph, else English.

ASR rows:
    {"audio": "clips/a.wav", "text": "reference transcript", "lang"?: "en"|"zh", "id"?: str}
    -> `model.transcribe(audio)` scored in words (WER, English) or characters (CER, Chinese); see `scoring`.

QA rows:
    {"audio": "q.wav", "question": "the question as text", "answers": ["accepted", "strings"],
     "lang"?: "en"|"zh", "id"?: str,
     "instruction"?: str, "content"?: str,              # LLaSO-style split of the question (both or neither)
     "instruction_audio"?: "i.wav", "content_audio"?: "c.wav"}
    A reply is correct when any accepted answer, normalized, occurs in the normalized reply.

QA modes (each a fresh `model.chat()`, greedy decoding):
    speech                          audio only: "audio"
    text                            text only: "question"
    instruction_text+content_audio  text "instruction" + "content_audio"      (rows with instruction/content and
    instruction_audio+content_text  "instruction_audio" + text "content"       the audio that mode needs;
    pure_audio                      the whole question spoken: "audio"         other rows are not counted)
The speech and pure_audio modes send the same input; a row's reply is computed once and shared.

A row whose audio is missing or unreadable (or that overflows the context) is an error for that mode: counted in
the summary and written in the per-item output, never fatal. Accuracy and error rates are over the rows that ran.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .audio import AudioError, NoSpeech
from .llm import LLMError
from .scoring import LANGS, EditCounts, answer_correct, detect_lang, normalization, score

log = logging.getLogger(__name__)

MODES = ("speech", "text", "instruction_text+content_audio", "instruction_audio+content_text", "pure_audio")
LLASO_MODES = MODES[2:]
CASCADE = "cascade"  # with a reference Whisper: its transcript of "audio", typed to the same bundle
UNITS = {"en": "word", "zh": "char"}


class ManifestError(ValueError):
    """A manifest line that is not a valid row; the message starts with file:line."""


# ---- manifests -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AsrRow:
    audio: Path
    text: str
    lang: str
    where: str = ""  # file:line
    id: str | None = None


@dataclass(frozen=True)
class QaRow:
    audio: Path
    question: str
    answers: tuple
    lang: str
    where: str = ""
    id: str | None = None
    instruction: str | None = None
    content: str | None = None
    instruction_audio: Path | None = None
    content_audio: Path | None = None

    def query(self, mode: str) -> tuple[Path | None, str | None] | None:
        """(audio, text) to send in a mode, or None when this row has no such configuration."""
        if mode == "speech":
            return self.audio, None
        if mode == "text":
            return None, self.question
        if mode == CASCADE:
            return self.audio, None  # evaluate_qa transcribes the audio and sends the text
        if mode not in MODES:
            raise ValueError(f"QA mode must be one of {MODES}, got {mode!r}")
        if self.instruction is None:
            return None
        if mode == "instruction_text+content_audio":
            return (self.content_audio, self.instruction) if self.content_audio else None
        if mode == "instruction_audio+content_text":
            return (self.instruction_audio, self.content) if self.instruction_audio else None
        return self.audio, None  # pure_audio


def _lines(path: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    """(file:line, object) for the non-blank lines of a JSONL file, at most limit of them."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    n = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            n += 1
            yield where, obj


def _get(obj: dict, key: str, where: str, kind: str, required: tuple, optional: bool = False,
         empty: bool = False) -> str | None:
    """obj[key] as a string (non-empty unless empty=True); None for an absent optional key."""
    if key not in obj:
        if optional:
            return None
        raise ManifestError(f"{where}: missing key {key!r} ({kind} rows need {', '.join(required)})")
    value = obj[key]
    if not isinstance(value, str) or not (empty or value.strip()):
        raise ManifestError(f"{where}: {key!r} must be a {'' if empty else 'non-empty '}string, found {value!r}")
    return value


def _lang(obj: dict, where: str, text: str) -> str:
    lang = obj.get("lang")
    if lang is None:
        return detect_lang(text)
    if lang not in LANGS:
        raise ManifestError(f"{where}: 'lang' must be one of {LANGS}, found {lang!r}")
    return lang


def _id(obj: dict) -> str | None:
    return None if obj.get("id") is None else str(obj["id"])


def read_asr_manifest(path, limit: int | None = None) -> list[AsrRow]:
    """Rows of an ASR manifest; ManifestError (file:line) on the first malformed line."""
    path, need = Path(path), ("audio", "text")
    rows = []
    for where, obj in _lines(path, limit):
        audio = _get(obj, "audio", where, "ASR", need)
        text = _get(obj, "text", where, "ASR", need, empty=True)  # an empty reference is scored (see scoring)
        rows.append(AsrRow(path.parent / audio, text, _lang(obj, where, text), where, _id(obj)))
    return rows


def read_qa_manifest(path, limit: int | None = None) -> list[QaRow]:
    """Rows of a QA manifest; ManifestError (file:line) on the first malformed line."""
    path, need = Path(path), ("audio", "question", "answers")
    rows = []
    for where, obj in _lines(path, limit):
        audio = _get(obj, "audio", where, "QA", need)
        question = _get(obj, "question", where, "QA", need)
        if "answers" not in obj:
            raise ManifestError(f"{where}: missing key 'answers' (QA rows need {', '.join(need)})")
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                    for a in answers):
            raise ManifestError(f"{where}: 'answers' must be a non-empty list of non-empty strings, found {answers!r}")
        llaso = {k: _get(obj, k, where, "QA", need, optional=True)
                 for k in ("instruction", "content", "instruction_audio", "content_audio")}
        if (llaso["instruction"] is None) != (llaso["content"] is None):
            raise ManifestError(f"{where}: 'instruction' and 'content' go together, found only one of them")
        if llaso["instruction"] is None and (llaso["instruction_audio"] or llaso["content_audio"]):
            raise ManifestError(f"{where}: 'instruction_audio'/'content_audio' need 'instruction' and 'content'")
        rows.append(QaRow(
            path.parent / audio, question, tuple(answers), _lang(obj, where, question + " " + " ".join(answers)),
            where, _id(obj), llaso["instruction"], llaso["content"],
            *(path.parent / llaso[k] if llaso[k] else None for k in ("instruction_audio", "content_audio"))))
    return rows


# ---- results -------------------------------------------------------------------------------------------------------

def _ms(timings: dict) -> dict:
    return {k: round(v, 2) for k, v in timings.items()}


@dataclass
class AsrItem:
    row: AsrRow
    hypothesis: str = ""
    counts: EditCounts | None = None  # None when the row failed
    error: str | None = None
    timings: dict = field(default_factory=dict)  # ms

    def to_dict(self) -> dict:
        return {"task": "asr", "mode": "asr", "where": self.row.where, "id": self.row.id,
                "audio": str(self.row.audio), "lang": self.row.lang, "unit": UNITS[self.row.lang],
                "reference": self.row.text, "reply": self.hypothesis,
                "correct": None if self.counts is None else self.counts.errors == 0,
                "score": None if self.counts is None else self.counts.to_dict(),
                "error": self.error, "timings": _ms(self.timings)}


@dataclass
class AsrResult:
    items: list[AsrItem]

    def counts(self, lang: str) -> EditCounts:
        """Corpus counts of one language: total edits over total reference words (en) or characters (zh)."""
        return sum((i.counts for i in self.items if i.counts is not None and i.row.lang == lang), EditCounts())

    def _rate(self, lang: str) -> float | None:
        return self.counts(lang).rate if any(i.counts is not None and i.row.lang == lang for i in self.items) else None

    @property
    def wer(self) -> float | None:
        return self._rate("en")

    @property
    def cer(self) -> float | None:
        return self._rate("zh")

    @property
    def n_errors(self) -> int:
        return sum(i.error is not None for i in self.items)

    def summary(self) -> dict:
        by_lang = {}
        for lang in LANGS:
            rows = [i for i in self.items if i.row.lang == lang]
            if rows:
                c = self.counts(lang)
                by_lang[lang] = {"n": len(rows), "errors": sum(i.error is not None for i in rows),
                                 "unit": UNITS[lang], **c.to_dict(), "rate": self._rate(lang)}
        return {"n": len(self.items), "errors": self.n_errors, "wer": self.wer, "cer": self.cer, "by_lang": by_lang}

    def lines(self) -> list[str]:
        out = [f"ASR  {len(self.items)} rows, {self.n_errors} errors"]
        for lang, s in self.summary()["by_lang"].items():
            name = "WER" if lang == "en" else "CER"
            rate = "     -" if s["rate"] is None else f"{100 * s['rate']:6.2f}%"
            out.append(f"  {lang}  {name} {rate}  ({s['edits']} edits: S {s['substitutions']} "
                       f"D {s['deletions']} I {s['insertions']} / {s['ref_len']} {s['unit']}s, {s['n']} rows)")
        return out


@dataclass
class QaItem:
    row: QaRow
    mode: str
    reply: str = ""
    correct: bool | None = None  # None when the row failed
    error: str | None = None
    timings: dict = field(default_factory=dict)  # ms
    tokens: int = 0
    heard: str | None = None  # what Whisper heard: the cascade's transcript, or the whisper-decoder's

    def to_dict(self) -> dict:
        audio, text = self.row.query(self.mode)
        return {"task": "qa", "mode": self.mode, "where": self.row.where, "id": self.row.id,
                "audio": None if audio is None else str(audio), "text": text, "lang": self.row.lang,
                "answers": list(self.row.answers), "reply": self.reply, "correct": self.correct,
                "error": self.error, "timings": _ms(self.timings), "tokens": self.tokens, "heard": self.heard}


@dataclass(frozen=True)
class ModeScore:
    mode: str
    n: int = 0  # rows that have this configuration
    correct: int = 0
    errors: int = 0  # rows that failed (bad audio...)

    @property
    def accuracy(self) -> float | None:
        """correct / rows that ran; None when none ran."""
        ran = self.n - self.errors
        return self.correct / ran if ran else None

    def to_dict(self) -> dict:
        return {"n": self.n, "correct": self.correct, "errors": self.errors, "accuracy": self.accuracy}


@dataclass
class QaResult:
    items: list[QaItem]
    modes: tuple = MODES
    n_rows: int = 0

    def scores(self) -> dict[str, ModeScore]:
        out = {}
        for mode in self.modes:
            its = [i for i in self.items if i.mode == mode]
            out[mode] = ModeScore(mode, len(its), sum(bool(i.correct) for i in its),
                                  sum(i.error is not None for i in its))
        return out

    @property
    def speech_text_ratio(self) -> float | None:
        """Accuracy of the speech path over that of the text path (None when either is missing or text is 0)."""
        s = self.scores()
        a = s["speech"].accuracy if "speech" in s else None
        b = s["text"].accuracy if "text" in s else None
        return a / b if a is not None and b else None

    def summary(self) -> dict:
        return {"n": self.n_rows,
                "modes": {m: s.to_dict() for m, s in self.scores().items()},
                "speech_text_ratio": self.speech_text_ratio}

    def lines(self) -> list[str]:
        out = [f"QA   {self.n_rows} rows"]
        for mode, s in self.scores().items():
            acc = "     -" if s.accuracy is None else f"{100 * s.accuracy:6.2f}%"
            out.append(f"  {mode:32s} {acc}  ({s.correct}/{s.n - s.errors} correct, {s.errors} errors)")
        ratio = self.speech_text_ratio
        out.append(f"  speech/text accuracy ratio      {'-' if ratio is None else f'{ratio:.3f}'}")
        return out


@dataclass
class Evaluation:
    asr: AsrResult | None = None
    qa: QaResult | None = None
    bundle: str = ""

    def summary(self) -> dict:
        out: dict = {"bundle": self.bundle, "normalization": normalization()}
        if self.asr is not None:
            out["asr"] = self.asr.summary()
        if self.qa is not None:
            out["qa"] = self.qa.summary()
        return out

    def lines(self) -> list[str]:
        """The results as text, headed by how the languages present were normalized for scoring."""
        langs = {i.row.lang for i in self.items()}
        head = [f"normalization {lang}: {how}" for lang, how in normalization().items() if lang in langs]
        return head + (self.asr.lines() if self.asr else []) + (self.qa.lines() if self.qa else [])

    def items(self) -> Iterator[AsrItem | QaItem]:
        yield from self.asr.items if self.asr else ()
        yield from self.qa.items if self.qa else ()


# ---- running -------------------------------------------------------------------------------------------------------

def _progress(items: Sequence, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional on the runtime side
        return items
    return tqdm(items, desc=desc, unit="item")


def _failure(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_modes(modes: Iterable[str], cascade: bool = False) -> tuple:
    """cascade: the mode "cascade" is allowed too (a reference Whisper is there to transcribe)."""
    modes = tuple(modes)
    known = MODES + ((CASCADE,) if cascade else ())
    bad = [m for m in modes if m not in known]
    if bad or not modes:
        raise ValueError(f"QA modes must be among {', '.join(known)}; got {', '.join(bad) or 'none'}"
                         + ("" if cascade or CASCADE not in bad else " (cascade needs --reference-whisper)"))
    return modes


def evaluate_asr(model, rows: Sequence[AsrRow], max_tokens: int = 256, progress: bool = False,
                 on_item: Callable[[AsrItem], None] | None = None) -> AsrResult:
    """Transcribe every row (`model.transcribe`, greedy) and score it; a bad row becomes an error item."""
    items = []
    for row in _progress(rows, "asr", progress):
        t0 = time.perf_counter()
        try:
            hyp = model.transcribe(str(row.audio), max_tokens=max_tokens)
        except (AudioError, LLMError) as e:
            item = AsrItem(row, error=_failure(e))
            log.debug("%s: %s", row.where, item.error)
        else:
            item = AsrItem(row, hyp, score(row.text, hyp, row.lang),
                           timings={"total": 1e3 * (time.perf_counter() - t0)})
        items.append(item)
        if on_item:
            on_item(item)
    return AsrResult(items)


class WhisperReference:
    """Whisper on its own (faster-whisper, CTranslate2), duck-typed as a model that transcribes: the reference
    WER of the very Whisper weights the bundle's encoder comes from."""

    def __init__(self, path, compute_type: str = "int8", threads: int | None = None):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ValueError("the Whisper reference needs faster-whisper: pip install 'llasm[bench]'") from e
        self.model = WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=threads or 0)

    def transcribe(self, audio, max_tokens: int = 256) -> str:
        from .audio import load_audio

        segments, _ = self.model.transcribe(load_audio(audio), beam_size=1, temperature=0.0,
                                            condition_on_previous_text=False)
        return " ".join(seg.text.strip() for seg in segments)


def evaluate_qa(model, rows: Sequence[QaRow], modes: Sequence[str] = MODES, max_tokens: int = 256,
                progress: bool = False, on_item: Callable[[QaItem], None] | None = None,
                reference: "WhisperReference | None" = None) -> QaResult:
    """Ask every row in every mode it supports, each in a fresh conversation, greedy; score the replies.
    reference: a Whisper for the cascade mode (its transcript of the spoken question, typed)."""
    modes = check_modes(modes, cascade=reference is not None)
    items = []
    for row in _progress(rows, "qa", progress):
        seen: dict = {}  # (audio, text) -> item fields: identical inputs decode identically
        for mode in modes:
            query = row.query(mode)
            if query is None:
                continue
            if mode == CASCADE:
                query = (CASCADE, row.audio)
            if query not in seen:
                audio, text = query
                try:
                    if mode == CASCADE:
                        audio, text = None, reference.transcribe(str(row.audio)) or "."
                    reply = model.chat().send(audio=None if audio is None else str(audio), text=text,
                                              max_tokens=max_tokens, temperature=0.0)
                except NoSpeech:  # the model's failure, not the row's: a wrong answer
                    seen[query] = {"reply": "", "correct": False, "heard": ""}
                except (AudioError, LLMError) as e:
                    seen[query] = {"error": _failure(e)}
                else:
                    seen[query] = {"reply": reply.text, "correct": answer_correct(reply.text, row.answers, row.lang),
                                   "timings": dict(reply.timings), "tokens": reply.tokens,
                                   "heard": text if mode == CASCADE else reply.heard}
            item = QaItem(row, mode, **seen[query])
            items.append(item)
            if on_item:
                on_item(item)
    return QaResult(items, modes, len(rows))


def evaluate(model, asr: Sequence[AsrRow] | None = None, qa: Sequence[QaRow] | None = None,
             modes: Sequence[str] = MODES, max_tokens: int = 256, progress: bool = False,
             on_item: Callable[[AsrItem | QaItem], None] | None = None, bundle: str = "",
             reference: "WhisperReference | None" = None) -> Evaluation:
    """Both tasks on one loaded model; on_item sees every item as it is scored (e.g. to write JSONL)."""
    return Evaluation(
        asr=None if asr is None else evaluate_asr(model, asr, max_tokens, progress, on_item),
        qa=None if qa is None else evaluate_qa(model, qa, modes, max_tokens, progress, on_item, reference),
        bundle=bundle)
