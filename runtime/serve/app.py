"""llasm-serve's routes: the OpenAI API over one engine, as a Starlette app served by uvicorn.

    POST /v1/chat/completions       messages of text and input_audio parts; "stream": true answers in server-sent
                                    events ending with "data: [DONE]"
    POST /v1/audio/transcriptions   multipart: file, response_format (json | text | verbose_json), language (checked
                                    against the languages a whisper-decoder bundle hears; Whisper still detects
                                    which of them is spoken); the text is LLaSM.transcribe's
    GET  /v1/models, /v1/models/{id}
    GET  /health                    no key needed: {"status": "ok", "model", "waiting", "served", ...}

Why Starlette (not FastAPI on top of it): the routes read OpenAI's bodies themselves, to answer every mistake with
OpenAI's error object and one line naming the field; FastAPI's pydantic validation would answer in its own shape,
to be undone. Starlette gives the rest: routing, streaming responses that notice a client leaving, multipart forms
(python-multipart); both it and uvicorn are well kept (Encode), and FastAPI itself runs on them.

Every error is an OpenAI error object with a 4xx for the client's mistakes and a 500 for the server's; a request's
failure never reaches the next one (the engine's worker goes on).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..audio import SAMPLE_RATE
from . import api
from .api import ApiError, Limits
from .engine import Engine

log = logging.getLogger(__name__)

DRAIN_FACTOR = 16  # a body over the limit is read (and dropped) up to this many times the limit, so that the client
#                   hears the 413 rather than a reset connection; past that the connection is dropped
POLL_S = 0.25  # how often a request waiting for its answer checks that its client is still there


class _Gone(Exception):
    """The client closed the connection."""


class _Events:
    """The engine's events for one request, from its worker thread into this event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:  # on the worker thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    async def next(self, request: Request):
        """The next event; _Gone where the client leaves while it waits."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _Gone from None

    async def of(self, request: Request, ticket):
        """The next event of `ticket`'s work; where waiting ends otherwise (the client left, the request was
        cancelled), the work is cancelled too."""
        try:
            return await self.next(request)
        except BaseException:
            ticket.cancel()
            raise


def create_app(engine: Engine, model_id: str, api_key: str | None = None, limits: Limits = Limits(),
               max_body: int = 25 << 20) -> Starlette:
    """The app for one engine. max_body: bytes a request body may have (413 past it)."""
    languages = tuple(engine.model.bundle.adaptor.get("languages", ()))
    created = int(time.time())

    def endpoint(handler, auth: bool = True):
        async def run(request: Request) -> Response:
            try:
                if auth and api_key is not None:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                        raise ApiError("missing or wrong API key: send 'Authorization: Bearer KEY' (llasm-serve "
                                       "--api-key)", status=401, code="invalid_api_key")
                return await handler(request)
            except _Gone:
                return Response(status_code=499)  # nobody reads it
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception as e:
                return error_response(e)
        return run

    async def body_of(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        over = length.isdigit() and int(length) > max_body
        chunks, n = [], 0
        async for part in request.stream():
            n += len(part)
            over = over or n > max_body
            if over and n > DRAIN_FACTOR * max_body:
                break
            if not over:
                chunks.append(part)
        if over:
            raise ApiError(f"the request body is over {max_body / (1 << 20):g} MiB (llasm-serve --max-body-mb)",
                           status=413, code="request_too_large")
        return b"".join(chunks)

    async def chat_completions(request: Request) -> Response:
        raw = await body_of(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = await run_in_threadpool(api.chat_request, body, limits)  # decoding audio takes a while
        events = _Events()
        ticket = engine.chat(req, events.emit)
        first = await events.of(request, ticket)
        if first[0] == "error":
            return error_response(first[1])
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(request, events, ticket, first, req, cid, now),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = first
        while event[0] == "piece":
            event = await events.of(request, ticket)
        if event[0] == "error":
            return error_response(event[1])
        result = event[1]
        return JSONResponse(api.completion(cid, now, model_id, result.reply, result.audio_tokens))

    async def _sse(request, events, ticket, first, req, cid, now):
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        event, done = first, False
        try:
            yield data(api.chunk(cid, now, model_id, {"role": "assistant", "content": "",
                                                      "heard": ticket.reply.heard}))
            while event[0] == "piece":
                yield data(api.chunk(cid, now, model_id, {"content": event[1]}))
                event = await events.next(request)
            if event[0] == "error":
                yield data(api.api_error(event[1]).body())
            else:
                reply = event[1].reply
                yield data(api.chunk(cid, now, model_id, {}, api.finish_reason(reply), timings=api.timings(reply)))
                if req.include_usage:
                    yield data(api.usage_chunk(cid, now, model_id, reply, event[1].audio_tokens))
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client left (or the stream failed): stop the answer
                ticket.cancel()

    async def transcriptions(request: Request) -> Response:
        raw = await body_of(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError("send the audio as multipart/form-data with a 'file' field", param="file")

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
        except HTTPException as e:  # what starlette makes of a malformed form
            raise ApiError(f"malformed multipart form: {e.detail}", param="file") from None
        try:
            file = form.get("file")
            audio = await file.read() if isinstance(file, UploadFile) else None
        finally:
            await form.close()
        fmt = form.get("response_format") or "json"
        if audio is None:
            raise ApiError("the form has no 'file' (the audio file to transcribe)", param="file")
        if fmt not in api.TRANSCRIPT_FORMATS:
            raise ApiError(f"response_format must be one of {', '.join(api.TRANSCRIPT_FORMATS)}, got {fmt!r}",
                           param="response_format")
        language = form.get("language") or None
        if language is not None and (not isinstance(language, str) or not re.fullmatch(r"[a-z]{2,3}", language)
                                     or (languages and language not in languages)):
            heard = f" this bundle hears {', '.join(languages)}" if languages else " an ISO-639-1 code"
            raise ApiError(f"language must be{heard}, got {language!r}", param="language")
        samples = await run_in_threadpool(api.decode_audio, audio, "file", limits)
        events = _Events()
        ticket = engine.transcribe(samples, events.emit)
        kind, value = await events.of(request, ticket)
        if kind == "error":
            return error_response(value)
        body = api.transcript(value, fmt, samples.size / SAMPLE_RATE, language)
        return PlainTextResponse(body) if fmt == "text" else JSONResponse(body)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llasm"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise ApiError(f"no model {request.path_params['model']!r}: this server has {model_id!r}", status=404,
                           param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "waiting": engine.waiting, "served": engine.served,
                             "cancelled": engine.cancelled, "refused": engine.refused, "failed": engine.failed})

    async def http_error(request: Request, e: HTTPException) -> Response:
        return error_response(ApiError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code,
                                       code="not_found" if e.status_code == 404 else None))

    async def server_error(request: Request, e: Exception) -> Response:
        return error_response(e)

    routes = [Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
              Route("/v1/audio/transcriptions", endpoint(transcriptions), methods=["POST"]),
              Route("/v1/models", endpoint(models), methods=["GET"]),
              Route("/v1/models/{model:path}", endpoint(model), methods=["GET"]),
              Route("/health", endpoint(health, auth=False), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def error_response(e: BaseException) -> JSONResponse:
    err = api.api_error(e)
    if err.status >= 500 and not isinstance(e, ApiError):
        log.error("%s", err.message, exc_info=e)
    return JSONResponse(err.body(), status_code=err.status)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket: a port that is taken fails here (OSError), before a model loads; port 0 picks a free one."""
    return socket.create_server((host, port))


def server(app, log_level: str = "warning"):
    """uvicorn's server for app: .run(sockets=[bind(...)]) serves until Ctrl-C, or until .should_exit is set from
    another thread. Logging goes through the llasm command's own setup (log_config=None)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=5))
