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
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .audio import SAMPLE_RATE, NoSpeech, load_audio
from .bundle import Bundle, BundleError, read_bundle
from .encoder import AudioEncoder, KeptRows
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
    prompt_positions: int = 0  # KV positions of the prompt answered: history and turn, audio rows included
    finish: str = ""  # why the answer ended: "stop" (end of turn, a stop string, a loop), "length" (max_tokens or
    #                   a full context), "cancelled" (Chat.cancel)


@dataclass
class Encoded:
    """The audio parts of a turn as the LLM reads them."""

    rows: list  # one (n, n_embd) array per audio part, in order
    heard: str | None  # what Whisper heard in them (whisper-decoder bundles), None for adaptors that hear no words
    timings: dict  # ms: features, encode (clips whose rows were kept cost none)


TRANSCRIPT_TOKENS_PER_S = 10  # read speech in the training data: 3.2 (en) and 2.5 (zh) Qwen tokens/s, at most 6.4
class LLaSM:
    """A loaded bundle: the audio encoder (onnxruntime) and the LLM (llama.cpp)."""

    def __init__(self, bundle: Bundle, encoder: AudioEncoder, llm: LLM, rows_cache: int = 0):
        """Computes bos + the default system prompt into the KV cache: new conversations start from it. rows_cache:
        how many recently encoded clips keep their rows (0: none), for callers that give the same audio again."""
        self.bundle = bundle
        self.encoder = encoder
        self.llm = llm
        self.kept = KeptRows(rows_cache) if rows_cache else None
        header = bundle.prompt.render([], add_generation_prompt=False)
        self.kv = KVLedger(llm, header=[llm.tokenize(seg.text) for seg in header])  # what the KV cache holds
        self.lock = threading.Lock()  # one llama.cpp context: one turn at a time

    @classmethod
    def load(cls, bundle=None, n_threads: int | None = None, n_gpu_layers: int = 0, n_ctx: int = 4096,
             verify: bool = True, verbose: bool = False, rows_cache: int = 0) -> "LLaSM":
        """bundle: a bundle directory. None: the default bundle, built on first use (that needs the export and base
        extras). This is runtime's one use of export; it loads torch only to build. rows_cache: see __init__."""
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
        return cls(b, encoder, llm, rows_cache=rows_cache)

    def chat(self, system: str | None = None, history=(), drop_oldest: bool = True) -> "Chat":
        """A new conversation; history: (user, assistant text) exchanges it starts from (see Chat)."""
        return Chat(self, system, history, drop_oldest)

    def encode(self, turn: Turn) -> Encoded:
        """The rows of a turn's audio parts (16 kHz sample arrays, as load_audio returns them), and what was heard;
        AudioError (NoSpeech) for audio the adaptor hears no words in. Kept rows are reused (rows_cache)."""
        rows, heard, t_feat, t_enc = [], [], 0.0, 0.0
        for part in turn.parts:
            if isinstance(part, str):
                continue
            key = self.kept.key(part) if self.kept is not None else None
            got = self.kept.get(key) if key is not None else None
            if got is None:
                a = time.perf_counter()
                mels = self.encoder.features(part)
                b = time.perf_counter()
                r, h = self.encoder.encode_heard(mels)
                t_feat += b - a
                t_enc += time.perf_counter() - b
                got = (r, None if h is None else h.text)
                if key is not None:
                    self.kept.put(key, *got)
            rows.append(got[0])
            heard += [got[1]] if got[1] is not None else []
        return Encoded(rows, " ".join(heard) if heard else None, {"features": 1e3 * t_feat, "encode": 1e3 * t_enc})

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

    def __init__(self, model: LLaSM, system: str | None = None, history=(), drop_oldest: bool = True):
        """history: (user, assistant text) exchanges the conversation starts from (examples for the model to follow,
        or a conversation a client keeps): user is text, or a user Turn of text and audio parts (audio: what
        load_audio reads; encoded now, AudioError for audio that cannot be used). They reach the KV cache with the
        first turn, and stay there for a conversation that starts alike. drop_oldest: a turn that would overflow the
        context drops the oldest exchanges (True) or raises ContextFull (False: the caller chose that history)."""
        self.model = model
        self.system = system
        self.drop_oldest = drop_oldest
        self.exchanges: list[_Exchange] = []
        llm, end = model.llm, model.bundle.prompt.end_of_turn
        for user, assistant in history:
            if isinstance(user, str):
                user = Turn("user", (user,))
            if not (isinstance(user, Turn) and user.role == "user" and isinstance(assistant, str)):
                raise ValueError(f"history holds (user text or user Turn, assistant text) pairs, got "
                                 f"{(user, assistant)!r}")
            user = _loaded(user)
            reply = llm.tokenize(assistant, special=False) + llm.tokenize(end)
            self.exchanges.append(_Exchange(user, model.encode(user).rows, reply, assistant))
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
               temperature: float = 0.0, seed: int = 0, stop: Sequence[str] = (), _reply: Reply | None = None,
               _turns: list[Turn] | None = None) -> Iterator[str]:
        """Text pieces of the answer as they are generated. stop: strings that end the answer (left out of it)."""
        t0 = time.perf_counter()
        samples = None
        if audio is not None:
            samples = load_audio(audio, sample_rate)  # AudioError before anything changes
        elif text is None:
            raise ValueError("a turn needs audio, text or both")
        if _turns is not None:  # a one-off prompt (transcribe): its audio part is this turn's audio
            turn = Turn("user", tuple(samples if p is None else p for t in _turns for p in t.parts))
        else:
            turn = Turn("user", tuple(([samples] if samples is not None else []) + ([text] if text else [])))
        yield from self.ask(turn, max_tokens, temperature, seed, stop, _reply, started=t0)

    def ask(self, turn: Turn, max_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
            stop: Sequence[str] = (), reply: Reply | None = None, started: float | None = None) -> Iterator[str]:
        """Text pieces of the answer to a user turn of text and audio parts, in any order and number (audio: a Path,
        the bytes of an audio file, or 16 kHz samples; a str is text). reply: filled in as the answer ends."""
        reply = reply if reply is not None else Reply("")
        if turn.role != "user" or not turn.parts:
            raise ValueError(f"a turn is a user Turn with audio, text or both, got {turn!r}")
        turn = _loaded(turn)  # AudioError before anything changes
        reply.audio_seconds = sum(p.size for p in turn.parts if not isinstance(p, str)) / SAMPLE_RATE
        encoded = self.model.encode(turn)  # encode before touching the KV cache: bad audio changes nothing
        reply.heard = encoded.heard
        reply.audio_rows = sum(len(r) for r in encoded.rows)
        yield from self.respond(turn, encoded.rows, max_tokens, temperature, seed, reply, started=started,
                                timings=encoded.timings, stop=stop)

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
        for drop in range(1, len(self.exchanges) + 1 if self.drop_oldest else 1):
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
                reply: Reply | None = None, started: float | None = None, timings: dict | None = None,
                stop: Sequence[str] = ()) -> Iterator[str]:
        """Text pieces of the answer to a user turn whose audio parts are encoded already (rows: one array per
        audio part, in order). Whatever the KV cache holds of history and turn already (a Listener's head start,
        a system prompt) is kept. reply: filled in as the answer ends; started: time.perf_counter() when the turn
        began (default now); timings: ms spent on it so far (features, encode); stop: strings that end the answer
        (left out of it; text that may be the start of one is held back until it is known not to be)."""
        reply = reply if reply is not None else Reply("")
        t0 = time.perf_counter() if started is None else started
        kv, llm, prompt = self.model.kv, self.model.llm, self.model.bundle.prompt
        with self.model.lock:
            self._cancel.clear()
            end = llm.tokenize(prompt.end_of_turn)
            feed = self._fit(turn, rows, reserve=min(max_tokens, llm.n_ctx // 4) + len(end))
            a = time.perf_counter()
            reply.prompt_positions = size(self._fed) + size(feed)
            reply.prefilled = kv.load(self._fed + feed)  # a failure leaves the conversation as it was
            t_prefill = time.perf_counter() - a
            prefilled = kv.size
            rng = np.random.default_rng(seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            generated: list[int] = []  # sampled; those fed to the KV cache sit from position `prefilled` on
            text = ""
            sent = 0  # characters of text handed out
            t_first = None
            stops = prompt.stop + [s for s in stop if s]
            longest_stop = max((len(s) for s in stops), default=0)
            reply.finish = "length"
            try:
                while len(generated) < max_tokens and kv.size + len(end) < llm.n_ctx:
                    if self._cancel.is_set():
                        reply.finish = "cancelled"
                        break
                    token = _sample(llm.logits(copy=False), temperature, rng)
                    if llm.is_eog(token):
                        reply.finish = "stop"
                        break
                    generated.append(token)
                    excess = loop_excess(generated)
                    if excess:  # keep one copy of the block; this token was never evaluated, the others were
                        del generated[len(generated) - excess:]
                        kv.truncate(prefilled + len(generated))
                        text = b"".join(llm.piece(t) for t in generated).decode("utf-8", "replace")
                        reply.looped, reply.finish = True, "stop"
                        break
                    piece = decoder.decode(llm.piece(token))
                    text += piece
                    if stops and any(s in text[-(len(piece) + longest_stop):] for s in stops):
                        text = text[: min(text.index(s) for s in stops if s in text)]
                        reply.finish = "stop"
                        break
                    if t_first is None:
                        t_first = time.perf_counter()
                    ready = len(text) - _stop_begun(text, stops)
                    if ready > sent:
                        out, sent = text[sent:ready], ready
                        yield out
                    kv.extend([[token]])
                if not reply.looped and len(text) > sent:  # what was held back for a stop string that never came
                    out, sent = text[sent:], len(text)
                    yield out
            except GeneratorExit:  # abandoned: the answer is what was handed out
                text = text[:sent]
                raise
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


def _loaded(turn: Turn) -> Turn:
    """The turn with its audio parts as 16 kHz samples (AudioError for audio that cannot be used)."""
    return Turn(turn.role, tuple(p if isinstance(p, str) else load_audio(p) for p in turn.parts))


def _stop_begun(text: str, stops: list[str]) -> int:
    """Characters at the end of text that begin a stop string (it may yet come)."""
    longest = max((len(s) for s in stops), default=0)
    for n in range(min(longest - 1, len(text)), 0, -1):
        end = text[-n:]
        if any(len(s) > n and s.startswith(end) for s in stops):
            return n
    return 0


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(p.size, p=p / p.sum()))
