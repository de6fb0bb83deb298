"""Conversation rows: the four kinds, what is typed beside the audio, and the LLM answers behind them (cached).

A kind is a layout of the user's turn: the audio alone (speech), the audio then typed text (speech+instruction, the
order in which the runtime sends a recording with a typed message), typed text then the audio (instruction+speech),
or text alone. What the turn asks depends on the sentence:
    a question        is answered (the LLM's answer, or one of its reference answers); beside the audio, the typed
                      text only says to answer it
    a statement       (no reference answer: a fortune, a verse, a dictionary example) has no natural reply, and an
                      LLM asked one bare mostly refuses it or repeats it; with an LLM it comes with a task (TASKS)
                      typed beside the audio, and the LLM is asked the task and the sentence, laid out as the turn is
    repeat            every fourth sentence, and every statement without an LLM: say what was said
The text path is asked exactly what the LLM was asked, so the speech path learns to behave like it.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..runtime.prompt import PromptFormat

if TYPE_CHECKING:
    from .sentences import Sentence

log = logging.getLogger(__name__)

KINDS = ("speech", "speech+instruction", "instruction+speech", "text")
ANSWER_INSTRUCTIONS = {
    "en": ["Answer the question in the audio.", "Listen and reply briefly.", "Respond to what you hear."],
    "zh": ["回答音频里的问题。", "听一听，然后简短地回答。", "请回应你听到的内容。"],
}
REPEAT_INSTRUCTIONS = {
    "en": ["Repeat what the speaker said.", "Write down the speaker's words.", "What did the speaker say?"],
    "zh": ["重复说话人说的话。", "写下你听到的内容。", "说话人说了什么？"],
}
TASKS = {  # typed beside a spoken statement; chosen for answers with content (training/README.md, measured)
    "en": ["Explain what this sentence means.", "Who or what is this sentence about?"],
    "zh": ["解释这句话的意思。", "把这句话翻译成英文。"],
}
JOINER = PromptFormat.audio_joiner  # the task and the sentence in a question, as a turn joins audio and text
QA_SOURCES = ("math", "facts", "chatterbot/trivia", "chatterbot/science", "chatterbot/history")
QA_MAX_WORDS = 4  # longer reference answers cannot be matched inside a free-form reply


class AnswerCache:
    """answers.jsonl: one {"lang", "question", "answer"} per line, appended as answers are computed."""

    def __init__(self, path: Path, answer: Callable[[str], str]):
        self.path, self.answer, self.computed, self.cached = path, answer, 0, 0
        self.known: dict[tuple, str] = {}
        self._fresh: set[tuple] = set()  # computed by prefetch in this run, not yet asked for
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.known[(row["lang"], row["question"])] = row["answer"]

    def __call__(self, lang: str, question: str) -> str:
        key = (lang, question)
        if key in self.known:
            self.cached += key not in self._fresh
            self._fresh.discard(key)
            return self.known[key]
        text = str(self.answer(question)).strip()
        if not text:
            raise ValueError("the answer callback returned an empty answer")
        self._keep([(key, text)])
        return text

    def prefetch(self, items: list[tuple], many: Callable[[list[str]], list[str]], size: int,
                 progress: bool = False) -> None:
        """Answer the (lang, question) items not yet known in groups of `size` with many(questions) -> answers, each
        group appended when done (a stopped build keeps them). A group that fails, and an empty answer, are left to
        __call__, one question at a time."""
        from tqdm import tqdm

        todo = list(dict.fromkeys(key for key in items if key not in self.known))
        groups = [todo[i:i + size] for i in range(0, len(todo), size)]
        for group in tqdm(groups, desc="answers", unit=f"x{size}", disable=not progress or not groups):
            try:
                replies = many([question for _, question in group])
            except Exception as e:  # the callback is user code (an LLM): these questions go one at a time later
                log.warning("%d answers at once failed (%s): left to one at a time", len(group), e)
                continue
            done = [(key, text) for key, text in zip(group, (str(r).strip() for r in replies)) if text]
            self._keep(done)
            self._fresh.update(key for key, _ in done)

    def _keep(self, answered: list[tuple]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for (lang, question), text in answered:
                f.write(json.dumps({"lang": lang, "question": question, "answer": text}, ensure_ascii=False) + "\n")
                self.known[(lang, question)] = text
        self.computed += len(answered)


def is_question(s: Sentence) -> bool:
    return bool(s.answers) or s.text.rstrip().endswith(("?", "？"))


@dataclass(frozen=True)
class Ask:
    """A sentence's conversation turn before its answer. typed: the text beside the audio (None: none); question:
    what the text path is asked, the LLM's question (None: a repeat, whose answer is the sentence)."""

    kind: str
    typed: str | None
    question: str | None


def ask(slot: str, s: Sentence, llm: bool, rng: random.Random) -> Ask:
    """The turn for a sentence whose place gives it kind `slot` (one of KINDS); llm: answers come from the LLM."""
    if slot not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {slot!r}")
    if slot == "instruction+speech" or not (s.answers or llm):  # nothing to answer it with: repeat it
        return Ask("instruction+speech", rng.choice(REPEAT_INSTRUCTIONS[s.lang]), None)
    if is_question(s):
        typed = rng.choice(ANSWER_INSTRUCTIONS[s.lang]) if slot == "speech+instruction" else None
        return Ask(slot, typed, s.text)
    task = rng.choice(TASKS[s.lang])
    if slot == "speech+instruction":
        return Ask(slot, task, s.text + JOINER + task)
    return Ask("instruction+speech" if slot == "speech" else slot, task, task + JOINER + s.text)


def is_task(question: str) -> bool:
    """Whether a cached question is a task about a statement rather than a spoken question itself."""
    return JOINER in question


def conversation(a: Ask, clip: str, answer: str) -> list[dict]:
    """The rows' turns; answer: the question's answer, or the sentence itself for a repeat."""
    if a.kind == "text":
        user = a.question
    elif a.typed is None:
        user = [{"audio": clip}]
    elif a.kind == "speech+instruction":
        user = [{"audio": clip}, {"text": a.typed}]
    else:
        user = [{"text": a.typed}, {"audio": clip}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
