"""Listening with the whisper-decoder adaptor: Whisper transcribes the turn while it is spoken, and the words it
agrees on are prefilled before the user lets go.

Every STEP_SECONDS of new audio, a pass transcribes the turn so far, with the words agreed on so far given to the
decoder as its prefix (only the rest is decoded). Tokens that two passes in a row agree on (local agreement, as
whisper_streaming commits text), up to the start of a word, are kept: their rows go into the KV cache behind the
conversation, and so are the rows of the words after them that the pass heard (`ahead`, a guess: the KV cache keeps
what the next pass or the end shares with it, as it keeps any common prefix). At the end of speech one last pass
transcribes the whole turn with the kept tokens as its prefix, so only the words after them are decoded, and only
the rows that differ from the guess are prefilled.

Whisper's encoder attends to all of its input, so a pass over part of the turn hears its words a little otherwise
than the whole turn would; the kept rows (and their candidates' mix) are those of the pass that agreed on them
(`llasm-eval --listen` scores what push-to-talk gives the LLM).
"""
from __future__ import annotations

import time

import numpy as np

from .audio import SAMPLE_RATE, NoSpeech

STEP_SECONDS = 0.5  # audio between passes: 1.0 s left 1.5-2 s of words to the end (BENCHMARKS.md)
LOOK_SAMPLES = 2560  # the listener looks at the audio every 0.16 s (where speech starts, whether it paused)
ENDS_SENTENCE = tuple(mark.encode("utf-8") for mark in ("。", "，", "！", "？", "、", "；", ",", ".", "!", "?", ";"))


class HeardPasses:
    """The passes of one listened turn (the Passes interface of listen.py): point() says where the next pass is due,
    run(x) runs it over the turn's audio x so far, final(x) gives all the turn's rows; `kept` holds the rows
    prefilled so far (the begin rows with the first of them), `heard` what the last final() heard."""

    def __init__(self, encoder, step_seconds: float = STEP_SECONDS):
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
        self.encoder, self.step_seconds = encoder, step_seconds
        self.transcriber, self.rowmap = encoder.transcriber, encoder.rowmap
        self.step = int(step_seconds * SAMPLE_RATE)
        self.row = LOOK_SAMPLES
        self.max_samples = encoder.geometry.max_chunk_samples
        self.begin = np.zeros((0, encoder.n_embd), np.float32)  # the first kept rows carry the begin rows
        self.kept: list[np.ndarray] = []
        self.agreed: list[int] = []  # Whisper tokens the kept rows stand for
        self.lang = None  # fixed once words are kept
        self.heard: str | None = None
        self.ahead: np.ndarray | None = None  # rows of the last pass's words after the agreed ones (a guess)
        self._last: list[int] | None = None  # the previous pass's tokens
        self._n = 0  # passes run

    def fresh(self) -> "HeardPasses":
        return HeardPasses(self.encoder, self.step_seconds)

    def point(self) -> int:
        return (self._n + 1) * self.step

    def skip(self, n_samples: int) -> None:
        """Of the passes due over the first n_samples of the turn and not run, only the last will run: each pass
        transcribes the whole turn so far, so the earlier ones would only delay it (speech found to have started
        a while ago, from the audio alone: listen.UNDECIDED_SECONDS)."""
        self._n = max(self._n, n_samples // self.step - 1)

    def run(self, x: np.ndarray) -> np.ndarray:
        """A pass over the turn so far: -> the rows it keeps (none where it agrees on no more whole words)."""
        self._n += 1
        heard = self.transcriber.transcribe(self.transcriber.features(x), self.lang, tuple(self.agreed))
        tokens, last = heard.tokens, self._last
        self._last = tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, last or [])) if a != b), min(len(tokens), len(last or [])))
        j = same
        while j > len(self.agreed) and not self._starts_word(tokens, j):
            j -= 1
        if j <= len(self.agreed):
            self.ahead = self.rowmap.rows_of(heard, len(self.agreed))
            return np.zeros((0, self.encoder.n_embd), np.float32)
        rows = self.rowmap.rows_of(heard, len(self.agreed), j)
        self.agreed, self.lang = list(tokens[:j]), heard.lang
        self.kept.append(rows)
        self.ahead = self.rowmap.rows_of(heard, j)
        return rows

    def _starts_word(self, tokens: list[int], j: int) -> bool:
        """Token j begins a word: it starts with a blank, or the token before it ends a sentence or clause (Mandarin
        has no blanks). The last token never does: the audio to come may go on with its word."""
        if j >= len(tokens) or j == 0:
            return False
        pieces = self.transcriber.vocab.pieces
        before = b"".join(pieces[t] for t in tokens[max(0, j - 3):j])  # a mark may be spread over byte tokens
        return pieces[tokens[j]].startswith(b" ") or before.endswith(ENDS_SENTENCE)

    def final(self, x: np.ndarray, timings: dict | None = None) -> np.ndarray:
        """All the turn's rows: the kept ones, then those of what the last pass heard after them (timings: ms of its
        features and its Whisper run). NoSpeech when Whisper heard no words."""
        prefix = tuple(self.agreed) if x.size <= self.max_samples else ()
        a = time.perf_counter()
        passes = self.transcriber.features(x)
        b = time.perf_counter()
        heard = self.transcriber.transcribe(passes, self.lang, prefix)
        if not heard.tokens:
            raise NoSpeech("heard no speech in the audio")
        rows = self.rowmap.rows_of(heard, len(prefix))
        if prefix:
            rows = np.concatenate(self.kept + [rows])
        if timings is not None:
            timings.update(features=1e3 * (b - a), encode=1e3 * (time.perf_counter() - b))
        self.heard = heard.text
        return rows
