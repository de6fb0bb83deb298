"""Conversation rows: the four kinds, their instructions, and the LLM answers behind them (cached)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Callable

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
