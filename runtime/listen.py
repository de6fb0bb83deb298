"""A spoken turn processed while it is spoken, so that the end of speech leaves little to do.

    listener = chat.listen()
    recorder.start(sink=listener.feed)        # 16 kHz blocks as they come, from any thread
    samples = recorder.stop()                 # the end of speech
    for piece in listener.answer():           # encodes and prefills only the last rows, then streams the answer
        print(piece, end="")

While audio comes in, a worker thread encodes it a step at a time: each pass runs the encoder on the new rows
with CONTEXT_ROWS before them and LOOKAHEAD_ROWS after them, keeps the new rows, and prefills them into the KV
cache behind the chat's history. Whisper's encoder attends to the whole pass, so a row needs audio on both sides
of it to come out as it would from the whole clip (measured in BENCHMARKS.md); the look-ahead rows are encoded
again by the next pass. At the end of speech the rows not yet kept are encoded in one pass and the turn is
answered as Chat.stream answers it, keeping whatever prefix of it the KV cache already holds.

Silence is trimmed as the recorder trims it (runtime.mic.voiced_span): the turn starts where speech starts, found
while listening, and ends where speech ends, found at the end. Streaming is only a head start: where anything
disagrees (the chat was used meanwhile, a start found differently at the end, more than one encoder pass of
audio), the answer recomputes what it needs and is the one Chat.stream would give for the same rows.
"""
from __future__ import annotations

import logging
import threading
import time
from itertools import takewhile
from typing import Iterator

import numpy as np

from .audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, NoSpeech, load_audio
from .chat import Reply
from .kv import size
from .mic import voiced_span
from .prompt import Turn

log = logging.getLogger(__name__)

STEP_ROWS = 6  # rows kept per encoder pass while listening (0.96 s at stack 8)
CONTEXT_ROWS = 25  # rows of audio before the new ones in each pass (4 s)
LOOKAHEAD_ROWS = 6  # rows of audio after the new ones in each pass: the newest audio is kept only a pass later
UNDECIDED_SECONDS = 2.0  # audio with no pause in it this long is taken as speech from its first sample
TRIM_TOLERANCE_SECONDS = 0.1  # where speech starts and ends, as found while listening, stands if the whole
#                                recording puts it this close (more quiet moves the noise floor a little)
PAUSE_SECONDS = 0.1  # silence after the speech and its trim margin (0.3 s in all) that makes the turn seem over


class Passes:
    """The encoder passes of a listener, without threads or the LLM: which rows each pass keeps, and the last pass.

    run(x) is a pass over x (the turn's audio so far, x.size a pass point); pass points are fixed, so the rows
    depend on the audio alone: point() says where the next pass is due."""

    def __init__(self, encoder, step_rows: int = STEP_ROWS, context_rows: int = CONTEXT_ROWS,
                 lookahead_rows: int = LOOKAHEAD_ROWS):
        if step_rows < 1 or lookahead_rows < 0 or context_rows < 0:
            raise ValueError(f"step_rows must be >= 1 and context_rows, lookahead_rows >= 0; got {step_rows}, "
                             f"{context_rows}, {lookahead_rows}")
        self.encoder = encoder
        self.row = encoder.geometry.samples_per_row
        self.max_samples = encoder.geometry.max_chunk_samples  # one encoder pass: longer turns are encoded at the end
        self.step, self.context, self.lookahead = step_rows, context_rows, lookahead_rows
        self.kept: list[np.ndarray] = []  # rows kept so far, boundary rows aside
        self.k = 0  # rows kept
        self.begin = None  # the begin-of-audio row, (1, n_embd)

    heard = None  # these rows hear no words
    ahead = None  # nor do they guess rows beyond the kept ones

    def fresh(self) -> "Passes":
        """Passes of the same settings, none run yet."""
        return Passes(self.encoder, self.step, self.context, self.lookahead)

    def point(self) -> int:
        """Samples of the turn's audio the next pass sees: STEP_ROWS more rows, and LOOKAHEAD_ROWS after them."""
        return (self.k + self.step + self.lookahead) * self.row

    def skip(self, n_samples: int) -> None:
        """Nothing to skip: each pass keeps the rows of its own stretch of audio."""

    def run(self, x: np.ndarray) -> np.ndarray:
        """One pass over x: -> the rows it keeps, (n, n_embd), those that end LOOKAHEAD_ROWS before x does."""
        upto = x.size // self.row - self.lookahead
        if upto <= self.k:
            return np.zeros((0, self.encoder.n_embd), np.float32)
        s = max(0, self.k - self.context)
        rows = self.encoder(x[s * self.row:])  # (begin + rows + end, n_embd)
        if self.begin is None:
            self.begin = rows[:1]
        new = rows[1 + self.k - s: 1 + upto - s]
        self.kept.append(new)
        self.k = upto
        return new

    def keeps(self, n_samples: int) -> int:
        """Kept rows that the turn's whole audio, n_samples long, still uses: a pass of it would keep them too."""
        return max(0, min(self.k, n_samples // self.row - self.lookahead)) if n_samples <= self.max_samples else 0

    def final(self, x: np.ndarray, timings: dict | None = None) -> np.ndarray:
        """All the turn's rows, boundary rows included: the kept ones, then one pass for the rest (timings: ms of
        its features and encoder run)."""
        k = self.keeps(x.size)
        s = max(0, k - self.context)
        a = time.perf_counter()
        mels = self.encoder.features(x[s * self.row:] if k else x)
        b = time.perf_counter()
        rows = self.encoder.encode(mels)
        if k:
            rows = np.concatenate([self.begin, np.concatenate(self.kept)[:k], rows[1 + k - s:]])
        if timings is not None:
            timings.update(features=1e3 * (b - a), encode=1e3 * (time.perf_counter() - b))
        return rows


def passes_for(encoder, **kw):
    """The listening passes of an adaptor: Passes where rows stand for stretches of audio (stack-mlp), HeardPasses
    where they are Whisper's words (whisper-decoder); None where rows need the whole turn (llasm-query)."""
    if encoder.geometry.rows == "frames":
        return Passes(encoder, **kw)
    if encoder.geometry.rows == "tokens":
        from .heard_passes import HeardPasses

        return HeardPasses(encoder, **kw)
    return None


def listened(encoder, samples: np.ndarray, **kw) -> tuple:
    """(rows, heard text or None) that a Listener (trim=False) gives the LLM for `samples`, however they are fed."""
    passes = passes_for(encoder, **kw)
    if passes is None:
        rows, heard = encoder.encode_heard(encoder.features(samples))
        return rows, heard.text if heard is not None else None
    while passes.point() <= samples.size and passes.point() <= passes.max_samples:
        passes.run(samples[:passes.point()])
    rows = passes.final(samples)
    return rows, passes.heard


def listened_rows(encoder, samples: np.ndarray, **kw) -> np.ndarray:
    """The rows a Listener (trim=False) gives the LLM for `samples`, however they are fed."""
    return listened(encoder, samples, **kw)[0]


class ListenedEncoder:
    """An AudioEncoder whose rows for a clip are those a Listener keeps (listened_rows): `llasm-eval --listen`
    scores what push-to-talk gives the LLM, on files."""

    def __init__(self, encoder, **kw):
        self.encoder, self.kw = encoder, kw
        self.geometry, self.n_embd = encoder.geometry, encoder.n_embd
        passes_for(encoder, **kw)  # bad settings fail here

    def features(self, samples: np.ndarray) -> list:
        return [samples]  # the passes compute their own

    def encode(self, parts: list) -> np.ndarray:
        return listened_rows(self.encoder, parts[0], **self.kw)

    def encode_heard(self, parts: list) -> tuple:
        """As encode, and what Whisper heard (whisper-decoder), as a Listener gives them."""
        rows, heard = listened(self.encoder, parts[0], **self.kw)
        return rows, (None if heard is None else _Heard(heard))

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return listened_rows(self.encoder, samples, **self.kw)


class _Heard:
    """What a listened turn heard, where Chat.stream expects a Heard: its text."""

    def __init__(self, text: str):
        self.text = text


class Listener:
    """One spoken user turn of `chat`, fed while it is spoken; see the module docstring."""

    def __init__(self, chat, trim: bool = True, **kw):
        self.chat = chat
        self.passes = passes_for(chat.model.encoder, **kw)
        self.trim = trim
        self.check = self.passes.row if self.passes else 2560  # samples between looks at the audio
        self._cond = threading.Condition()
        self._blocks: list[np.ndarray] = []
        self._n = 0  # samples fed
        self._start = None if trim else 0  # sample where the turn's audio starts, once known
        self._next = self.check if trim or not self.passes else self.passes.point()  # what the next look sees
        self._closed = False
        self._stopped = False  # the worker has stopped listening ahead
        self._ahead: list = []  # the feed of this turn so far that the KV cache holds after the chat's history
        self._guess = (None, None, None, None)  # (start, end, rows, heard) of the audio last prefilled whole
        self._answered = False
        self._worker = None
        if self.passes is None:  # rows need the whole turn (the query adaptor's): answer() does all the work
            self._stopped = True
        else:
            self._worker = threading.Thread(target=self._run, name="llasm-listener", daemon=True)
            self._worker.start()

    @property
    def rows_ahead(self) -> int:
        """Audio rows already in the KV cache (begin and end rows included)."""
        return sum(len(f) for f in self._ahead if isinstance(f, np.ndarray))

    @property
    def answered_ahead(self) -> bool:
        """The whole turn, up to the answer's first token, is in the KV cache: speech seemed over, and was."""
        return bool(self._ahead) and not isinstance(self._ahead[-1], np.ndarray)

    def feed(self, samples) -> None:
        """Float samples at 16 kHz, (n,) or (n, channels), in order, from any thread. Audio fed after answer()
        starts is ignored."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim == 2:  # (frames, channels), as audio callbacks give them
            x = x.mean(axis=1)
        if x.ndim != 1:
            raise ValueError(f"audio blocks must be (n,) or (n, channels), got shape {x.shape}")
        with self._cond:
            if self._closed or not x.size:
                return
            self._blocks.append(x)
            self._n += x.size
            if self._n >= self._next:
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has looked at all the audio fed so far (or has stopped listening ahead)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stopped or self._n < self._next, timeout)

    def _audio(self) -> np.ndarray:
        with self._cond:
            if len(self._blocks) > 1:
                self._blocks = [np.concatenate(self._blocks)]
            return self._blocks[0] if self._blocks else np.zeros(0, np.float32)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._n >= self._next)
                    if self._closed:
                        return
                # Each look sees the audio up to a fixed point, however late it runs: what is kept depends on the
                # audio alone, not on the machine's speed or the size of the blocks fed.
                if not self._look(self._audio()[:self._next]):
                    return
                with self._cond:
                    self._cond.notify_all()
        except Exception as e:  # a head start only (a full context, say): answer() recomputes what is missing
            log.info("listening ahead stopped: %s", e)
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _look(self, audio: np.ndarray) -> bool:
        """Find where speech starts; then either run the passes now due, or, where speech seems over, prefill the
        whole turn as answer() would for the audio so far. False: stop listening ahead."""
        if self._start is None:
            span = voiced_span(audio)
            if span is None or (span == (0, audio.size) and audio.size < UNDECIDED_SECONDS * SAMPLE_RATE):
                self._next = audio.size + self.check  # no speech (or no pause) yet
                return True
            self._start = span[0]
            self.passes.skip(audio.size - self._start)  # found late: the passes due need not all run
        span = voiced_span(audio) if self.trim else None
        if span is not None and audio.size - span[1] >= PAUSE_SECONDS * SAMPLE_RATE:
            x = audio[self._start: span[1]]
            ok = True
            guessed = self._guess[0] == self._start and self._near(span[1], self._guess[1])
            if MIN_SAMPLES <= x.size <= self.passes.max_samples and not guessed:
                try:
                    rows = self.passes.final(x)
                except NoSpeech:  # nothing said yet that Whisper would call speech: wait for more
                    rows = None
                if rows is not None:
                    ok = self._reach(self.chat.feed(Turn("user", (x,)), [rows]))
                    self._guess = (self._start, span[1], rows, self.passes.heard)
            self._next = audio.size + self.check  # the passes wait: speech may go on, and they catch up then
            return ok
        ok = True
        while ok and self._start + self.passes.point() <= audio.size:  # the passes due (several, to catch up)
            x = audio[self._start: self._start + self.passes.point()]
            ok = x.size <= self.passes.max_samples
            if ok:
                self.passes.run(x)
                guess = [] if self.passes.ahead is None else [self.passes.ahead]
                kept = [np.concatenate([self.passes.begin] + self.passes.kept + guess)]
                ok = self._reach(self.chat.feed(Turn("user", (x,)), kept, through_audio=True))
        self._next = min(self._start + self.passes.point(), audio.size + self.check)
        return ok

    def _reach(self, feed: list) -> bool:
        """Make the KV cache hold the chat's history and then `feed` (this turn so far), keeping what it holds of
        them already. False: another conversation has used the KV cache since the last reach."""
        chat, kv = self.chat, self.chat.model.kv
        with chat.model.lock:
            history = chat.history()
            if self._ahead and not kv.holds(history + self._ahead):
                return False
            kv.load(history + feed)
            self._ahead = feed
            return True

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()

    def cancel(self) -> None:
        """Drop the turn: the KV cache and the conversation are left as they were before it."""
        self._close()
        chat, kv = self.chat, self.chat.model.kv
        with chat.model.lock:
            history = chat.history()
            if self._ahead and kv.holds(history + self._ahead):
                lead = 0 if history else size(takewhile(lambda f: not isinstance(f, np.ndarray), self._ahead))
                kv.truncate(size(history) + lead)  # a new conversation keeps its cached header
            self._ahead = []

    def _speech(self, audio: np.ndarray) -> tuple[int, int]:
        """Where the turn's audio starts and ends, trimmed. A start found at the end far from the one found while
        listening drops the kept rows: they belong to audio cut at another place."""
        start, end = self._start or 0, audio.size
        if self.trim:
            span = voiced_span(audio)
            if span is None:
                raise AudioError("heard no speech: the recording is silent")
            if not self._near(span[0], self._start) and self.passes is not None:
                start = span[0]
                self.passes = self.passes.fresh()
            end = self._guess[1] if start == self._guess[0] and self._near(span[1], self._guess[1]) else span[1]
        return start, end

    @staticmethod
    def _near(a: int, b: int | None) -> bool:
        return b is not None and abs(a - b) <= TRIM_TOLERANCE_SECONDS * SAMPLE_RATE

    def answer(self, text: str | None = None, max_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
               _reply: Reply | None = None) -> Iterator[str]:
        """The end of speech: text pieces of the answer as they are generated (text: more of the same user turn,
        after the audio). Timings count from here. A recording with no speech raises AudioError and changes
        nothing."""
        if self._answered:
            raise RuntimeError("this turn has been answered already: start another with chat.listen()")
        self._answered = True
        reply = _reply if _reply is not None else Reply("")
        t0 = time.perf_counter()
        self._close()
        audio = self._audio()
        try:
            start, end = self._speech(audio)
            x = load_audio(audio[start:end])
        except AudioError:
            self.cancel()
            raise
        reply.audio_seconds = x.size / SAMPLE_RATE
        timings = {"features": 0.0, "encode": 0.0}
        try:
            if self._guess[:2] == (start, end):  # speech was over when it seemed over: the rows are computed already
                rows, reply.heard = self._guess[2], self._guess[3]
            elif self.passes is None:
                a = time.perf_counter()
                mels = self.chat.model.encoder.features(x)
                b = time.perf_counter()
                rows, heard = self.chat.model.encoder.encode_heard(mels)
                timings.update(features=1e3 * (b - a), encode=1e3 * (time.perf_counter() - b))
                reply.heard = heard.text if heard is not None else None
            else:
                rows = self.passes.final(x, timings)
                reply.heard = self.passes.heard
        except AudioError:
            self.cancel()
            raise
        reply.audio_rows = len(rows)
        turn = Turn("user", (x,) + ((text,) if text else ()))
        yield from self.chat.respond(turn, [rows], max_tokens, temperature, seed, reply, started=t0, timings=timings)
