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
from .kv import KVLedger, size
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
    prefilled: int = 0  # KV positions computed before the first token (the rest of the prompt was in the cache)


TRANSCRIPT_TOKENS_PER_S = 10  # read speech in the training data: 3.2 (en) and 2.5 (zh) Qwen tokens/s, at most 6.4
class LLaSM:
    """A loaded bundle: the audio encoder (onnxruntime) and the LLM (llama.cpp)."""

    def __init__(self, bundle: Bundle, encoder: AudioEncoder, llm: LLM):
        """Computes bos + the default system prompt into the KV cache: new conversations start from it."""
        self.bundle = bundle
        self.encoder = encoder
        self.llm = llm
        header = bundle.prompt.render([], add_generation_prompt=False)
        self.kv = KVLedger(llm, header=[llm.tokenize(seg.text) for seg in header])  # what the KV cache holds
        self.lock = threading.Lock()  # one llama.cpp context: one turn at a time

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
        return cls(b, encoder, llm)

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
    """One conversation. Each turn asks the KV ledger to hold the history and the new turn: while this
    conversation is the last one answered, that computes the new turn only, and earlier audio is never encoded or
    prefilled again; after another conversation, what the two share from the start is kept.

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
        self._fed: list = self._replay(self.exchanges)  # the history as the KV cache holds it: tokens and rows
        self._cancel = threading.Event()
        self.dropped = 0  # exchanges dropped to fit the context

    @property
    def turns(self) -> list[Turn]:
        """The conversation so far."""
        out = []
        for ex in self.exchanges:
            out += [ex.user, Turn("assistant", (ex.text,))]
        return out

    def history(self) -> list:
        """The feed (token lists and row arrays) of the conversation so far, as the KV cache holds it between turns;
        empty for a new conversation, whose first turn brings the system prompt."""
        return list(self._fed)

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
        yield from self.respond(turn, rows, max_tokens, temperature, seed, reply, started=t0,
                                timings={"features": 1e3 * t_feat, "encode": 1e3 * t_enc})

    def feed(self, turn: Turn, rows: list, through_audio: bool = False) -> list:
        """Token lists and row arrays of one user turn after the history, then the generation prompt (a new
        conversation's first turn starts with its system prompt). rows: one array per audio part of the turn, in
        order. through_audio: the turn only up to the end of its last audio part (a turn still being spoken)."""
        out = self._feed(turn, rows, start=not self.exchanges)
        if through_audio:
            out = out[:max((i + 1 for i, f in enumerate(out) if isinstance(f, np.ndarray)), default=0)]
        return out

    def _feed(self, turn: Turn, rows: list, start: bool) -> list:
        """Token lists and row arrays of one user turn + the generation prompt (start: with bos and the system
        prompt)."""
        rows = iter(rows)
        out = []
        for seg in self.model.bundle.prompt.render([turn], add_generation_prompt=True, system=self.system,
                                                   start=start):
            out.append(next(rows) if seg.is_audio else self.model.llm.tokenize(seg.text))
        return out

    def _replay(self, exchanges: list[_Exchange]) -> list:
        fed = []
        for i, ex in enumerate(exchanges):
            fed += self._feed(ex.user, ex.rows, start=i == 0) + [ex.reply]
        return fed

    def _fit(self, turn: Turn, rows: list, reserve: int) -> list:
        """The new turn's feed, dropping the oldest exchanges first where history, turn and answer would not fit
        (the turn then prefills the rest again)."""
        n_ctx = self.model.llm.n_ctx
        feed = self._feed(turn, rows, start=not self.exchanges)
        if size(self._fed) + size(feed) + reserve <= n_ctx:  # the KV cache's other contents don't count
            return feed
        for drop in range(1, len(self.exchanges) + 1):
            kept = self.exchanges[drop:]
            fed = self._replay(kept)
            feed = self._feed(turn, rows, start=not kept)
            if size(fed) + size(feed) + reserve <= n_ctx:
                log.info("context full: dropped the %d oldest exchange(s)", drop)
                self.exchanges, self._fed = kept, fed
                self.dropped += drop
                return feed
        raise ContextFull(f"this turn needs {size(feed) + reserve} positions (with {reserve} for the answer), "
                          f"the context holds {n_ctx}")

    def listen(self, trim: bool = True, **kw) -> "Listener":
        """A spoken turn fed as it is spoken (a microphone): Listener.feed(samples) while it lasts, then
        Listener.answer() streams the answer, having only the last rows left to encode and prefill."""
        from .listen import Listener

        return Listener(self, trim=trim, **kw)

    def respond(self, turn: Turn, rows: list, max_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
                reply: Reply | None = None, started: float | None = None, timings: dict | None = None
                ) -> Iterator[str]:
        """Text pieces of the answer to a user turn whose audio parts are encoded already (rows: one array per
        audio part, in order). Whatever the KV cache holds of history and turn already (a Listener's head start,
        a system prompt) is kept. reply: filled in as the answer ends; started: time.perf_counter() when the turn
        began (default now); timings: ms spent on it so far (features, encode)."""
        reply = reply if reply is not None else Reply("")
        t0 = time.perf_counter() if started is None else started
        kv, llm, prompt = self.model.kv, self.model.llm, self.model.bundle.prompt
        with self.model.lock:
            self._cancel.clear()
            end = llm.tokenize(prompt.end_of_turn)
            feed = self._fit(turn, rows, reserve=min(max_tokens, llm.n_ctx // 4) + len(end))
            a = time.perf_counter()
            reply.prefilled = kv.load(self._fed + feed)  # a failure leaves the conversation as it was
            t_prefill = time.perf_counter() - a
            prefilled = kv.size
            rng = np.random.default_rng(seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            generated: list[int] = []  # sampled; those fed to the KV cache sit from position `prefilled` on
            text = ""
            t_first = None
            stops = prompt.stop
            longest_stop = max((len(s) for s in stops), default=0)
            try:
                while len(generated) < max_tokens and not self._cancel.is_set() and kv.size + len(end) < llm.n_ctx:
                    token = _sample(llm.logits(copy=False), temperature, rng)
                    if llm.is_eog(token):
                        break
                    generated.append(token)
                    excess = loop_excess(generated)
                    if excess:  # keep one copy of the block; this token was never evaluated, the others were
                        del generated[len(generated) - excess:]
                        kv.truncate(prefilled + len(generated))
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
                    kv.extend([[token]])
            finally:
                # Close the assistant turn as training rendered it, even for an abandoned stream.
                evaluated = generated[:kv.size - prefilled]
                try:
                    kv.extend([end])
                    evaluated = evaluated + end
                except Exception:
                    kv.truncate(prefilled + len(evaluated))
                self._fed += feed + [evaluated]
                self.exchanges.append(_Exchange(turn, rows, evaluated, text))
                now = time.perf_counter()
                decode_s = now - (t_first or now)
                reply.tokens = len(generated)
                reply.tokens_per_s = (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0
                reply.timings = {"features": 0.0, "encode": 0.0, **(timings or {}), "prefill": 1e3 * t_prefill,
                                 "first_token": 1e3 * ((t_first or now) - t0), "total": 1e3 * (now - t0)}
                reply.text = text


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(p.size, p=p / p.sum()))
