"""The Python API for desktop apps: load a bundle, hold conversations, stream answers.

    from llasm import LLaSM
    model = LLaSM.load("bundle/")
    chat = model.chat()
    reply = chat.send(audio="q.wav")          # or text="...", or both
    for piece in chat.stream(text="and why?"):
        print(piece, end="")
"""
from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .audio import SAMPLE_RATE, NoSpeech, load_audio
from .bundle import Bundle, BundleError, read_bundle
from .encoder import AudioEncoder
from .llm import LLM, ContextFull
from .loops import loop_excess
from .prompt import Turn, transcribe_turns

if TYPE_CHECKING:
    from .listen import Listener

log = logging.getLogger(__name__)

DEFAULT_BUNDLE_ENV = "LLASM_BUNDLE"


def default_bundle_path() -> Path:
    env = os.environ.get(DEFAULT_BUNDLE_ENV)
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "llasm" / "bundles" / "default"


@dataclass
class Reply:
    text: str
    timings: dict = field(default_factory=dict)  # ms: features, encode, prefill, first_token, total
    tokens: int = 0
    tokens_per_s: float = 0.0
    audio_seconds: float = 0.0
    looped: bool = False  # stopped at a decoding loop: text and history keep one copy of the repeated block
    heard: str | None = None  # what Whisper heard in the turn's audio (whisper-decoder bundles), for display only:
    #                           the LLM reads the audio's rows, never this text
    audio_rows: int = 0  # LLM positions the turn's audio took


TRANSCRIPT_TOKENS_PER_S = 10  # read speech in the training data: 3.2 (en) and 2.5 (zh) Qwen tokens/s, at most 6.4
class LLaSM:
    """A loaded bundle: the audio encoder (onnxruntime) and the LLM (llama.cpp)."""

    def __init__(self, bundle: Bundle, encoder: AudioEncoder, llm: LLM):
        self.bundle = bundle
        self.encoder = encoder
        self.llm = llm
        self.lock = threading.Lock()  # one llama.cpp context: one turn at a time
        self.owner = None  # the Chat whose history the KV cache holds

    @classmethod
    def load(cls, bundle=None, n_threads: int | None = None, n_gpu_layers: int = 0, n_ctx: int = 4096,
             verify: bool = True, verbose: bool = False) -> "LLaSM":
        """bundle: a bundle directory. None: the default bundle, built on first use (that needs the export and base
        extras). This is runtime's one use of export; it loads torch only to build."""
        if bundle is None:
            from ..export.default import ensure_default_bundle

            path = ensure_default_bundle()
        else:
            path = Path(bundle)
        b = read_bundle(path, verify=verify)
        heard = b.adaptor["kind"] == "whisper-decoder"  # its rows come from the LLM's own embeddings: after the LLM
        encoder = None if heard else AudioEncoder(b.audio_encoder, b.geometry, n_threads=n_threads)
        if encoder is not None and encoder.n_embd != b.n_embd:
            raise BundleError(f"bundle needs n_embd {b.n_embd}, audio encoder gives {encoder.n_embd}")
        llm = LLM(b.llm, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=verbose,
                  lora_path=b.llm_lora)
        if llm.n_embd != b.n_embd:
            raise BundleError(f"bundle needs n_embd {b.n_embd}, the LLM has {llm.n_embd}")
        llm.warm_up()
        if heard:
            from .heard_rows import heard_encoder

            encoder = heard_encoder(b, llm, n_threads)
        model = cls(b, encoder, llm)
        model._prefill_default_header()
        return model

    def _prefill_default_header(self) -> None:
        """Put bos + the default system prompt in the KV cache now; new conversations start from it."""
        for seg in self.bundle.prompt.render([], add_generation_prompt=False):
            self.llm.eval_tokens(self.llm.tokenize(seg.text))

    def chat(self, system: str | None = None, history=()) -> "Chat":
        """A new conversation; history: (user text, assistant text) exchanges it starts from."""
        return Chat(self, system, history)

    def transcribe(self, audio, sample_rate: int | None = None, max_tokens: int | None = None) -> str:
        """Speech to text through the LLM, with the bundle's transcribe instruction; leaves no history. A transcript
        stops at TRANSCRIPT_TOKENS_PER_S per second of audio (+16): longer is a decoding loop, not speech."""
        samples = load_audio(audio, sample_rate)
        cap = int(TRANSCRIPT_TOKENS_PER_S * samples.size / SAMPLE_RATE) + 16
        b = self.bundle  # a bundle may give examples to follow (an LLM that was never taught to transcribe)
        chat = Chat(self, system=b.transcribe_system, history=b.transcribe_examples)
        try:
            return chat.send(audio=samples, max_tokens=cap if max_tokens is None else min(max_tokens, cap),
                             _turns=transcribe_turns(None, b.transcribe_instruction)).text.strip()
        except NoSpeech:
            return ""  # as Whisper transcribes audio it judges free of speech

    def close(self) -> None:
        self.llm.close()


@dataclass
class _Exchange:
    """One finished user turn and its answer, with what it cost in the KV cache."""

    user: Turn  # audio parts as sample arrays
    rows: list  # embedding rows of each audio part, in order
    reply: list  # evaluated answer tokens + end-of-turn tokens
    text: str


class Chat:
    """One conversation. Its KV cache lives across turns; earlier audio is never encoded or prefilled again.

    When a turn would overflow the context, the oldest exchanges are dropped and the rest is prefilled again
    from their stored embedding rows (audio is not re-encoded).
    """

    def __init__(self, model: LLaSM, system: str | None = None, history=()):
        """history: (user text, assistant text) exchanges the conversation starts from (examples for the model to
        follow); they reach the KV cache with the first turn, and stay there for a conversation that starts alike."""
        self.model = model
        self.system = system
        self.exchanges: list[_Exchange] = []
        llm, end = model.llm, model.bundle.prompt.end_of_turn
        for user, assistant in history:
            if not (isinstance(user, str) and isinstance(assistant, str)):
                raise ValueError(f"history holds (user text, assistant text) pairs, got {(user, assistant)!r}")
            reply = llm.tokenize(assistant, special=False) + llm.tokenize(end)
            self.exchanges.append(_Exchange(Turn("user", (user,)), [], reply, assistant))
        self._fed: list = self._replay(self.exchanges)  # what this chat put in the KV cache: tokens and rows
        self._cancel = threading.Event()
        self.dropped = 0  # exchanges dropped to fit the context

    @property
    def turns(self) -> list[Turn]:
        """The conversation so far."""
        out = []
        for ex in self.exchanges:
            out += [ex.user, Turn("assistant", (ex.text,))]
        return out

    def reset(self) -> None:
        with self.model.lock:  # the KV cache is left as it is: the next turn reuses its system prompt
            self.exchanges, self._fed = [], []

    def cancel(self) -> None:
        """Stop the answer being generated (from any thread); the partial answer stays in the history."""
        self._cancel.set()

    def send(self, audio=None, text: str | None = None, **kw) -> Reply:
        reply = Reply("")
        pieces = list(self.stream(audio=audio, text=text, _reply=reply, **kw))
        if not reply.looped:
            reply.text = "".join(pieces)
        return reply

    def stream(self, audio=None, text: str | None = None, sample_rate: int | None = None, max_tokens: int = 512,
               temperature: float = 0.0, seed: int = 0, _reply: Reply | None = None,
               _turns: list[Turn] | None = None) -> Iterator[str]:
        """Text pieces of the answer as they are generated."""
        reply = _reply if _reply is not None else Reply("")
        t0 = time.perf_counter()
        samples = None
        if audio is not None:
            samples = load_audio(audio, sample_rate)  # AudioError before anything changes
            reply.audio_seconds = samples.size / SAMPLE_RATE
        elif text is None:
            raise ValueError("a turn needs audio, text or both")
        if _turns is not None:  # a one-off prompt (transcribe): its audio part is this turn's audio
            turn = Turn("user", tuple(samples if p is None else p for t in _turns for p in t.parts))
        else:
            turn = Turn("user", tuple(([samples] if samples is not None else []) + ([text] if text else [])))
        rows, heard, t_feat, t_enc = [], [], 0.0, 0.0
        for part in turn.parts:  # encode before touching the KV cache: bad audio changes nothing
            if not isinstance(part, str):
                a = time.perf_counter()
                mels = self.model.encoder.features(part)
                b = time.perf_counter()
                r, h = self.model.encoder.encode_heard(mels)
                rows.append(r)
                heard += [h.text] if h is not None else []
                t_feat += b - a
                t_enc += time.perf_counter() - b
        reply.heard = " ".join(heard) if heard else None
        reply.audio_rows = sum(len(r) for r in rows)
        yield from self._generate(turn, rows, reply, t0, t_feat, t_enc, max_tokens, temperature, seed)

    def _feed(self, turn: Turn, rows: list, start: bool) -> list:
        """Token lists and embedding arrays for one user turn + the generation prompt."""
        rows = iter(rows)
        out = []
        for seg in self.model.bundle.prompt.render([turn], add_generation_prompt=True, system=self.system,
                                                   start=start):
            out.append(next(rows) if seg.is_audio else self.model.llm.tokenize(seg.text))
        return out

    def _prefix(self) -> list:
        """The feed of a spoken user turn up to its audio (chat markup; the system prompt in a new conversation)."""
        feed = self._feed(Turn("user", (np.zeros(0, np.float32),)), [None], start=not self.exchanges)
        return feed[:feed.index(None)]

    def _replay(self, exchanges: list[_Exchange]) -> list:
        fed = []
        for i, ex in enumerate(exchanges):
            fed += self._feed(ex.user, ex.rows, start=i == 0) + [ex.reply]
        return fed

    def _prefill(self, items: list) -> None:
        self.model.llm.eval(items)

    def _load(self, items: list) -> int:
        """Make the KV cache hold exactly `items`, keeping the longest token prefix it already holds
        (a system prompt another conversation left there); -> positions that had to be computed. The last position
        is always computed: llama.cpp's logits are those of the last decode, and the caller reads them next."""
        llm = self.model.llm
        same = 0
        for f in items:
            if isinstance(f, np.ndarray):
                break  # audio rows have no ids to compare: never reused across conversations
            cached = llm.cache[same: same + len(f)]
            n = next((i for i, (a, b) in enumerate(zip(f, cached)) if a != b), min(len(f), len(cached)))
            same += n
            if n < len(f):
                break
        same = min(same, _size(items) - 1)
        llm.truncate(same)
        self._prefill(_skip(items, same))
        return llm.n_past - same

    def _sync(self) -> None:
        """Make the KV cache hold exactly this chat's history (another chat may have used it)."""
        llm = self.model.llm
        if not self._fed or (self.model.owner is self and llm.n_past == _size(self._fed)):
            self.model.owner = self  # a new conversation loads its first turn with _load, reusing the cache
            return
        self.model.owner = None
        self._load(self._fed)
        self.model.owner = self

    def _fit(self, turn: Turn, rows: list, reserve: int) -> list:
        """The new turn's feed, dropping the oldest exchanges (and prefilling the rest again) if needed."""
        llm = self.model.llm
        feed = self._feed(turn, rows, start=not self.exchanges)
        if _size(self._fed) + _size(feed) + reserve <= llm.n_ctx:  # not n_past: another chat's leftovers don't count
            return feed
        for drop in range(1, len(self.exchanges) + 1):
            kept = self.exchanges[drop:]
            fed = self._replay(kept)
            feed = self._feed(turn, rows, start=not kept)
            if _size(fed) + _size(feed) + reserve <= llm.n_ctx:
                log.info("context full: dropped the %d oldest exchange(s)", drop)
                llm.truncate(0)
                self.exchanges, self._fed = kept, fed
                self.dropped += drop
                self._prefill(fed)
                return feed
        raise ContextFull(f"this turn needs {_size(feed) + reserve} positions (with {reserve} for the answer), "
                          f"the context holds {llm.n_ctx}")

    def listen(self, trim: bool = True, **kw) -> "Listener":
        """A spoken turn fed as it is spoken (a microphone): Listener.feed(samples) while it lasts, then
        Listener.answer() streams the answer, having only the last rows left to encode and prefill."""
        from .listen import Listener

        return Listener(self, trim=trim, **kw)

    def _generate(self, turn, rows, reply, t0, t_feat, t_enc, max_tokens, temperature, seed, ahead=()):
        """ahead: what a Listener already put in the KV cache after this chat's history; the part of it that
        begins this turn's feed is kept, the rest recomputed."""
        llm = self.model.llm
        prompt = self.model.bundle.prompt
        with self.model.lock:
            self._cancel.clear()
            if not (ahead and self.model.owner is self and llm.n_past == _size(self._fed) + _size(ahead)):
                ahead = ()  # another conversation has used the KV cache since
                self._sync()
            dropped = self.dropped
            end = llm.tokenize(prompt.end_of_turn)
            feed = self._fit(turn, rows, reserve=min(max_tokens, llm.n_ctx // 4) + len(end))
            if self.dropped != dropped:
                ahead = ()  # _fit prefilled the kept exchanges again from position 0
            start = _size(self._fed) if self._fed else 0
            try:
                a = time.perf_counter()
                if ahead:
                    keep = _common(ahead, feed)
                    if keep < _size(feed) or llm.n_past != _size(self._fed) + keep or not llm.has_logits:
                        keep = min(keep, _size(feed) - 1)  # decode at least one position: the logits are this turn's
                        llm.truncate(_size(self._fed) + keep)
                        self._prefill(_skip(feed, keep))
                elif not self._fed:  # a new conversation: reuse a cached system prompt
                    self._load(feed)
                else:
                    self._prefill(feed)
                t_prefill = time.perf_counter() - a
            except BaseException:
                llm.truncate(start)  # a failed turn leaves the conversation as it was
                raise
            prefilled = llm.n_past
            rng = np.random.default_rng(seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            generated: list[int] = []
            text = ""
            t_first = None
            stops = prompt.stop
            longest_stop = max((len(s) for s in stops), default=0)
            try:
                while len(generated) < max_tokens and not self._cancel.is_set() and llm.n_past + len(end) < llm.n_ctx:
                    token = _sample(llm.logits(copy=False), temperature, rng)
                    if llm.is_eog(token):
                        break
                    generated.append(token)
                    excess = loop_excess(generated)
                    if excess:  # keep one copy of the block; this token was never evaluated, the others were
                        del generated[len(generated) - excess:]
                        llm.truncate(prefilled + len(generated))
                        text = b"".join(llm.piece(t) for t in generated).decode("utf-8", "replace")
                        reply.looped = True
                        break
                    piece = decoder.decode(llm.piece(token))
                    text += piece
                    if stops and any(s in text[-(len(piece) + longest_stop):] for s in stops):
                        text = text[: min(text.index(s) for s in stops if s in text)]
                        break
                    if t_first is None:
                        t_first = time.perf_counter()
                    if piece:
                        yield piece
                    llm.eval_tokens([token])
            finally:
                # Close the assistant turn as training rendered it, even for an abandoned stream.
                evaluated = llm.cache[prefilled:]
                try:
                    llm.eval_tokens(end)
                    evaluated = evaluated + end
                except Exception:
                    llm.truncate(prefilled + len(evaluated))
                self._fed += feed + [evaluated]
                self.exchanges.append(_Exchange(turn, rows, evaluated, text))
                now = time.perf_counter()
                decode_s = now - (t_first or now)
                reply.tokens = len(generated)
                reply.tokens_per_s = (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0
                reply.timings = {"features": 1e3 * t_feat, "encode": 1e3 * t_enc, "prefill": 1e3 * t_prefill,
                                 "first_token": 1e3 * ((t_first or now) - t0), "total": 1e3 * (now - t0)}
                reply.text = text


def _size(items: list) -> int:
    """KV positions a feed takes."""
    return sum(len(f) for f in items)


def _skip(items: list, n: int) -> list:
    """items (token lists and row arrays) without their first n positions."""
    rest = []
    for f in items:
        if n >= len(f):
            n -= len(f)
            continue
        rest.append(f[n:])
        n = 0
    return rest


def _positions(items: list) -> Iterator:
    for f in items:
        if isinstance(f, np.ndarray):
            yield from (row.tobytes() for row in f)
        else:
            yield from f


def _common(a: list, b: list) -> int:
    """How many positions two feeds share from the start: equal token ids, bit-equal rows."""
    n = 0
    for x, y in zip(_positions(a), _positions(b)):
        if type(x) is not type(y) or x != y:
            break
        n += 1
    return n


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(p.size, p=p / p.sum()))
