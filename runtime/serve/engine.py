"""One model, many clients: requests wait in one queue and are answered one at a time, on one worker thread, with the
model's one llama.cpp context.

A client sends its whole conversation with every request. Each is answered by a Chat built from that history
(LLaSM.chat(history=...)): the model's KV ledger keeps the longest prefix the cache holds, rows included, so a
conversation that goes on computes only its new turn; and the model keeps the rows of recent clips (rows_cache), so
its audio is not encoded again. The answer depends on the request only, never on what was served before it.

Why not N llama.cpp slots (parallel sequences, decoded in one batch): measured on 2 cores with the default bundle,
one decode of 4 tokens costs 1.9x one of 1 token, so 4 slots could give up to ~2x the tokens per second of long
answers; but a spoken request spends most of its time in Whisper and the prefill, which use both cores already (81
requests a minute with 1 client, 84 with 4: BENCHMARKS.md), and each slot would need its own KV ledger. Worth it
only where several clients want long answers at once.

Work reports to the client through emit(event), called on the worker thread, in order:
    ("piece", text)...   then   ("done", result)   or   ("error", exception)
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from ..chat import LLaSM, Reply
from .api import ApiError, ChatRequest, api_error

log = logging.getLogger(__name__)


class Busy(ApiError):
    def __init__(self, waiting: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting (llasm-serve --max-queue)", status=503,
                         type="server_error", code="server_busy")


@dataclass
class ChatResult:
    reply: Reply
    audio_tokens: int  # rows of every clip in the prompt, history included


class Ticket:
    """A request in the queue or being answered; cancel() from any thread drops it or stops its answer."""

    def __init__(self, emit: Callable):
        self.emit = emit
        self.reply = Reply("")  # a chat's, filled in as it is answered (heard: before the first piece)
        self._cancelled = threading.Event()
        self._hooks: list[Callable] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def on_cancel(self, hook: Callable) -> None:
        """Call hook on cancel (at once where cancelled already)."""
        with self._lock:
            self._hooks.append(hook)
            now = self._cancelled.is_set()
        if now:
            hook()


class Engine:
    def __init__(self, model: LLaSM, max_queue: int = 64):
        self.model = model
        self.max_queue = max_queue
        self.served = self.cancelled = self.refused = self.failed = 0  # requests, by how they ended
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0  # queued or being answered
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="llasm-serve-worker", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def chat(self, request: ChatRequest, emit: Callable) -> Ticket:
        return self._submit(lambda ticket: self._chat(request, ticket), emit)

    def transcribe(self, samples, emit: Callable) -> Ticket:
        return self._submit(lambda ticket: ticket.emit(("done", self.model.transcribe(samples))), emit)

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the answer under way; requests still waiting get an error."""
        self._jobs.put(None)
        self._worker.join(timeout)

    def _submit(self, run: Callable, emit: Callable) -> Ticket:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise Busy(self._waiting)
            self._waiting += 1
        ticket = Ticket(emit)
        self._jobs.put((run, ticket))
        return ticket

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            run, ticket = job
            try:
                if ticket.cancelled:  # its client left while it waited
                    self.cancelled += 1
                    continue
                run(ticket)
                if ticket.cancelled or ticket.reply.finish == "cancelled":
                    self.cancelled += 1
                else:
                    self.served += 1
            except Exception as e:  # the next request is answered all the same
                if api_error(e).status >= 500:  # the app logs it, with its traceback
                    self.failed += 1
                else:
                    self.refused += 1
                _send(ticket, ("error", e))
            finally:
                with self._lock:
                    self._waiting -= 1
        while True:  # closing: what still waits is told so
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _send(job[1], ("error", ApiError("the server is shutting down", 503, "server_error")))

    def _chat(self, request: ChatRequest, ticket: Ticket) -> None:
        chat = self.model.chat(system=request.system, history=request.history, drop_oldest=False)
        ticket.on_cancel(chat.cancel)
        reply = ticket.reply
        pieces = chat.ask(request.turn, request.max_tokens, request.temperature, request.seed, request.stop, reply)
        try:
            for piece in pieces:
                _send(ticket, ("piece", piece))
                if ticket.cancelled:
                    break
        finally:
            pieces.close()
        audio = sum(len(rows) for ex in chat.exchanges for rows in ex.rows)
        _send(ticket, ("done", ChatResult(reply, audio)))


def _send(ticket: Ticket, event: tuple) -> None:
    try:
        ticket.emit(event)
    except Exception:  # the client's side is gone (its event loop closed): nothing to tell
        log.debug("an event for a client that left was dropped", exc_info=True)
