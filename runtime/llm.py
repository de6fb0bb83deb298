"""llama.cpp through llama-cpp-python: text as tokens, audio as embedding batches, fed at the end of one sequence.

The LLM knows how many KV positions it holds and whether its logits are the last one's; what each position holds
is recorded by the KV ledger (kv.py) that a loaded bundle feeds it through.
"""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from .token_rows import TokenRows, TokenRowsError

log = logging.getLogger(__name__)

_LLAMA_LOG_LEVELS = {1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}
_llama_log = logging.getLogger(__name__ + ".llama_cpp")
_log_callback = None  # kept referenced: llama.cpp holds a raw pointer to it


def _route_llama_logs(llama_cpp) -> None:
    """llama.cpp's own messages go to Python logging at DEBUG (the CLI shows them with -v), never to stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if _llama_log.isEnabledFor(logging.DEBUG):
            _llama_log.debug("%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


FALLBACK_NOTE = "llama.cpp runs without extra buffer types (AMX, repacked weights)"
_ENV_HINT = "LLASM_EXTRA_BUFTS=on|off overrides"
_said: set = set()


def _say_once(message: str, level: int) -> None:
    """A one-line note, once per process (each model load would repeat it): a warning the time the CPU check finds
    the fault (every CLI shows it), then at INFO (shown by CLIs that show progress, and with -v)."""
    if message not in _said:
        _said.add(message)
        log.log(level, "%s", message)


class LLMError(RuntimeError):
    pass


class ContextFull(LLMError):
    pass


class LLM:
    """One llama.cpp model and context, loaded with the low-level API (the `Llama` class cannot turn off extra
    buffer types, which fault on some CPUs: cpu_check.py). extra_bufts: None decides by cpu_check."""

    def __init__(self, path, n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = 0, verbose: bool = False, lora_path=None,
                 extra_bufts: bool | None = None, n_seq: int = 1):
        try:
            import llama_cpp
        except ImportError as e:
            raise LLMError("llama-cpp-python is not installed: pip install llama-cpp-python") from e
        self._lib = llama_cpp
        self.model = self.ctx = self._lora = None
        self._tokens = self._embeds = None
        _route_llama_logs(llama_cpp)
        if not os.path.isfile(path):
            raise LLMError(f"llama.cpp cannot load {path}: no such file")
        if extra_bufts is None:
            from .cpu_check import extra_bufts as check

            verdict = check(path, n_gpu_layers)
            extra_bufts = verdict.extra_bufts
            if not extra_bufts:
                _say_once(f"{FALLBACK_NOTE}: {verdict.why}; {_ENV_HINT}", logging.WARNING if verdict.checked_now
                          else logging.INFO)
        self.extra_bufts = extra_bufts
        n_threads = n_threads or max(1, os.cpu_count() or 1)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not self.model:
            self.model = None
            raise LLMError(f"llama.cpp cannot load {path}: not a GGUF model it reads (run with -v for its log)")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.n_seq_max, cp.kv_unified = n_seq, n_seq > 1  # complete_many's sequences share the n_ctx positions
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.ctx = None
            self.close()
            raise LLMError(f"llama.cpp cannot make a context of {n_ctx} positions for {path}")
        if lora_path:
            self._lora = llama_cpp.llama_adapter_lora_init(self.model, str(lora_path).encode("utf-8"))
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora) if self._lora else None
            if not self._lora or llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                self.close()
                raise LLMError(f"llama.cpp cannot apply the LoRA adapter {lora_path} to {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch, self.n_seq = n_batch, n_seq
        self._tokens = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._embeds = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)
        self._n_past = 0  # KV positions held
        self._marked = 0  # the lowest n_past since mark()
        self.decodes = 0  # llama_decode calls made
        self._logits_at = 0  # n_past right after the decode whose logits llama.cpp holds; 0: none
        self.token_rows = None  # TokenRows, once warm_up has checked they reproduce the token path
        self._path = path

    @property
    def n_past(self) -> int:
        """KV positions held: the next one fed goes there."""
        return self._n_past

    def mark(self) -> None:
        """Start counting `untouched` from now."""
        self._marked = self._n_past

    @property
    def untouched(self) -> int:
        """Positions that hold what they held at mark(): none has been truncated away since (decodes only add
        positions at the end)."""
        return min(self._marked, self._n_past)

    @property
    def has_logits(self) -> bool:
        """llama.cpp's logits are those of the last position in the cache: the last decode ended there (the cache
        grows only by decodes, so a truncate since shows as a shorter one)."""
        return self._logits_at > 0 and self._logits_at == self.n_past

    def tokenize(self, text: str | bytes, special: bool = True) -> list[int]:
        """Text with special tokens parsed (chat markup; special=False: what someone said, taken literally), never an
        implicit BOS: the prompt format adds it."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        if n < 0:  # more tokens than bytes cannot happen for BPE; a tokenizer that does says how many
            n_max = -n
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens give none)."""
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    @property
    def chat_template(self) -> str:
        """The GGUF's own chat template (Jinja), "" when it has none."""
        t = self._lib.llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else ""

    def special_text(self, which: str) -> str:
        """The text of the vocabulary's "bos" or "eos" token, "" when it has none."""
        token = {"bos": self._lib.llama_vocab_bos, "eos": self._lib.llama_vocab_eos}[which](self.vocab)
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def prompt_format(self):
        """The conversation format read from the GGUF's chat template (as training reads the tokenizer's)."""
        from .prompt import PromptFormat, jinja_renderer

        if not self.chat_template:
            raise LLMError(f"{self._path} has no chat template; an instruction-tuned LLM is needed")
        bos, eos = self.special_text("bos"), self.special_text("eos")
        return PromptFormat.from_chat_template(jinja_renderer(self.chat_template, bos, eos), bos=bos)

    def complete(self, ids: list[int], max_tokens: int) -> bytes:
        """Greedy continuation of ids from an empty cache, up to an end-of-generation token: its bytes."""
        self.truncate(0)
        self.eval_tokens(ids)
        out = []
        for _ in range(max_tokens):
            token = int(np.argmax(self.logits(copy=False)))
            if self.is_eog(token) or self.n_past >= self.n_ctx:
                break
            out.append(token)
            self.eval_tokens([token])
        self.truncate(0)
        return b"".join(self.piece(t) for t in out)

    def complete_many(self, prompts: list[list[int]], max_tokens: int) -> list[bytes]:
        """What complete() gives for each prompt, up to n_seq of them decoded together: one sequence each, and one
        llama_decode a step for all that are still going (on 2 CPU cores, 1.8x the answers in the same time for
        8 at once). Greedy ties may fall otherwise than one at a time. Starts from and leaves an empty cache."""
        if len(prompts) > self.n_seq or not all(prompts):
            raise LLMError(f"complete_many takes 1 to {self.n_seq} prompts (this context's), none empty; got "
                           f"{[len(p) for p in prompts]} tokens")
        self.truncate(0)
        self._room(sum(len(p) for p in prompts) + len(prompts) * max_tokens)
        mem = self._lib.llama_get_memory(self.ctx)
        out: list[list[int]] = [[] for _ in prompts]
        going: dict[int, int] = {}  # sequence -> its next token, not yet fed
        try:
            for seq, ids in enumerate(prompts):
                for start in range(0, len(ids), self.n_batch):
                    self._decode_seqs([(seq, start + i, t) for i, t in enumerate(ids[start:start + self.n_batch])],
                                      last_only=True)
                going[seq] = int(np.argmax(self.logits(copy=False)))
            while True:
                going = {seq: t for seq, t in going.items() if not self.is_eog(t) and len(out[seq]) < max_tokens}
                for seq, t in going.items():
                    out[seq].append(t)
                step = [(seq, len(prompts[seq]) + len(out[seq]) - 1, t) for seq, t in going.items()
                        if len(out[seq]) < max_tokens]
                if not step:
                    break
                self._decode_seqs(step, last_only=False)
                going = {seq: int(np.argmax(self._logits_ith(i))) for i, (seq, _, _) in enumerate(step)}
        finally:
            self._lib.llama_memory_clear(mem, True)
            self._logits_at = 0
        return [b"".join(self.piece(t) for t in ids) for ids in out]

    def _decode_seqs(self, items: list[tuple], last_only: bool) -> None:
        """(sequence, position, token) items in one llama_decode: logits for the last item, or for every item."""
        batch = self._tokens
        for i, (seq, pos, token) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = not last_only or i == len(items) - 1
        batch.n_tokens = len(items)
        self.decodes += 1
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise LLMError(f"llama_decode failed on {len(items)} tokens of {self.n_seq} sequences (code {rc})")

    def _logits_ith(self, i: int) -> np.ndarray:
        """A view of the logits of item i of the last decoded batch (-1: its last item with logits)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def _room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ContextFull(f"context full: {self.n_past} + {n} positions exceed n_ctx {self.n_ctx}")

    def _decode(self, batch, n: int, what: str) -> None:
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        self.decodes += 1
        self._logits_at = 0
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            self.truncate(self.n_past)  # drop whatever the failed batch may have left in the KV cache
            raise LLMError(f"llama_decode failed on {n} {what} (code {rc})")
        self._logits_at = self.n_past + n  # the caller counts the n positions next

    def eval_tokens(self, ids: list[int]) -> None:
        self._room(len(ids))
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            for i, t in enumerate(chunk):
                self._tokens.token[i] = t
            self._decode(self._tokens, len(chunk), "tokens")
            self._n_past += len(chunk)

    def eval_embeddings(self, rows: np.ndarray) -> None:
        """(n, n_embd) rows in the LLM's input-embedding space, fed in batches of at most n_batch."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise LLMError(f"embedding rows have shape {rows.shape}, the LLM takes (n, {self.n_embd})")
        self._room(rows.shape[0])
        for start in range(0, rows.shape[0], self.n_batch):
            chunk = rows[start:start + self.n_batch]
            ctypes.memmove(self._embeds.embd, chunk.ctypes.data, chunk.nbytes)
            self._decode(self._embeds, chunk.shape[0], "embedding rows")
            self._n_past += chunk.shape[0]

    def eval(self, items: list) -> None:
        """Token lists and embedding arrays, in order. Audio among text goes as one embedding batch, the text as
        the model's own token rows: one llama_decode (per n_batch rows) instead of one per item."""
        items = [f for f in items if len(f)]
        if self.token_rows is None or all(not isinstance(f, np.ndarray) for f in items):
            tokens: list[int] = []  # adjacent token lists go as one batch
            for f in items + [None]:
                if f is not None and not isinstance(f, np.ndarray):
                    tokens += list(f)
                    continue
                if tokens:
                    self.eval_tokens(tokens)
                    tokens = []
                if f is not None:
                    self.eval_embeddings(f)
            return
        self.eval_embeddings(np.concatenate([f if isinstance(f, np.ndarray) else self.token_rows.rows(f)
                                             for f in items]))

    def logits(self, copy: bool = True) -> np.ndarray:
        """Logits after the last evaluated position, (n_vocab,) float32. copy=False: a view into llama.cpp's
        buffer, valid until the next decode (the per-token sampler reads it at once)."""
        view = self._logits_ith(-1)
        return view.copy() if copy else view

    def truncate(self, n: int) -> None:
        """Forget KV positions n and later."""
        mem = self._lib.llama_get_memory(self.ctx)
        self._lib.llama_memory_seq_rm(mem, 0, n, -1)
        self._n_past = min(self._n_past, n)
        self._marked = min(self._marked, n)

    def save_state(self):
        """The KV cache's contents copied out of llama.cpp (a ctypes byte array), for load_state."""
        n = self._lib.llama_state_seq_get_size(self.ctx, 0)
        state = (ctypes.c_uint8 * n)()
        if self._lib.llama_state_seq_get_data(self.ctx, state, n, 0) != n:
            raise LLMError(f"llama.cpp cannot copy its KV cache out ({n} bytes)")
        return state

    def load_state(self, state) -> None:
        """Make the KV cache hold again what it held at save_state(); the logits are no position's of it."""
        self.truncate(0)
        self._logits_at = 0
        if not self._lib.llama_state_seq_set_data(self.ctx, state, len(state), 0):
            self.truncate(0)
            raise LLMError(f"llama.cpp cannot put a saved KV cache back ({len(state)} bytes)")
        self._n_past = int(self._lib.llama_memory_seq_pos_max(self._lib.llama_get_memory(self.ctx), 0)) + 1

    def warm_up(self) -> None:
        """One decode of each kind, so the first real question does not pay for lazy initialisation; and the token
        rows read from the GGUF are used only where, fed as embeddings, they give the token path's logits."""
        n = self.n_past
        ids = self.tokenize("Hello") or [0]
        self.eval_tokens(ids)
        want = self.logits()
        self.truncate(n)
        try:
            rows = TokenRows(self._path)
            if rows.n_embd != self.n_embd:
                raise TokenRowsError(f"token rows have {rows.n_embd} columns, the LLM takes {self.n_embd}")
            self.eval_embeddings(rows.rows(ids))
            diff = float(np.abs(self.logits(copy=False) - want).max())
            if diff <= 1e-4 * max(1.0, float(np.abs(want).max())):
                self.token_rows = rows
            else:
                log.info("token rows from the GGUF change the logits by %.3g: text goes as tokens", diff)
        except TokenRowsError as e:
            self.eval_embeddings(np.zeros((2, self.n_embd), dtype=np.float32))
            log.info("text goes to llama.cpp as tokens (%s)", e)
        self.truncate(n)

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        for batch in ("_tokens", "_embeds"):
            if getattr(self, batch, None) is not None:
                lib.llama_batch_free(getattr(self, batch))
                setattr(self, batch, None)
        if getattr(self, "ctx", None) is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_lora", None):
            lib.llama_adapter_lora_free(self._lora)
        self._lora = None
        if getattr(self, "model", None) is not None:
            lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
