"""The OpenAI API's shapes: a chat completion request read into a conversation of llasm Turns, replies written as
completion objects and stream chunks, errors as error objects. No web framework here (app.py serves these).

    messages    system (or developer) messages first, then user and assistant in turn, ending with the user's
    user parts  {"type": "text", "text": ...} and {"type": "input_audio", "input_audio": {"data": base64, "format":
                wav | mp3 | flac | ogg}}, any number, in any order; consecutive user messages are one turn
    answers     the message has "content", and "heard": what Whisper heard in the last user message's audio
                (whisper-decoder bundles; null for adaptors that hear no words, and for a turn without audio)
    usage       prompt_tokens counts every KV position of the prompt, audio rows included;
                prompt_tokens_details.audio_tokens the audio rows among them, cached_tokens those the KV cache held

Unknown top-level fields are ignored, as OpenAI-compatible servers do (top_p, tools, user...); what would be
answered wrongly if ignored (n > 1, audio output, tool messages, content parts other than text and audio) is refused.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from ..audio import SAMPLE_RATE, AudioError, NoSpeech, load_audio
from ..chat import Reply
from ..llm import ContextFull
from ..prompt import Turn

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json")
MAX_STOPS = 4  # as OpenAI
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = one_line(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def api_error(e: BaseException) -> ApiError:
    """The error object a client gets for an exception: its own input's fault is a 400, the rest a 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, NoSpeech):
        return ApiError(f"{e}: nothing to answer", param="messages", code="no_speech")
    if isinstance(e, AudioError):
        return ApiError(str(e), param="messages", code="invalid_audio")
    if isinstance(e, ContextFull):
        return ApiError(str(e), param="messages", code="context_length_exceeded")
    return ApiError(f"internal error: {type(e).__name__}: {one_line(e)}", status=500, type="server_error")


@dataclass(frozen=True)
class Limits:
    max_audio_seconds: float = 120.0  # one clip
    max_tokens: int = 512  # an answer's length where the request gives none
    temperature: float = 0.0  # where the request gives none: greedy


@dataclass
class ChatRequest:
    system: str | None  # None: the bundle's default system prompt
    history: list  # (user Turn, assistant text) exchanges before the turn
    turn: Turn  # the last user message(s): text and 16 kHz sample arrays
    max_tokens: int
    temperature: float
    seed: int = 0
    stop: tuple = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(f"'{name}' must be between {low} and {high}, got {value}" if high is not None else
                       f"'{name}' must be at least {low}, got {value}", param=name)
    return kind(value)


def chat_request(body, limits: Limits) -> ChatRequest:
    """A chat completion request, checked, its audio decoded (ApiError naming the field at fault)."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of messages", param="messages")
    if _number(body, "n", int, 1) != 1:
        raise ApiError("this server gives one choice: 'n' must be 1", param="n")
    if "audio" in (body.get("modalities") or ()):
        raise ApiError("this server answers in text only: 'modalities' cannot ask for audio", param="modalities")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, int, limits.max_tokens, low=1)
    temperature = _number(body, "temperature", float, limits.temperature, low=0, high=2)
    seed = _number(body, "seed", int, 0)
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop")

    system, turns = [], []  # turns: [role, parts] in order, user and assistant alternating
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{param} must be an object with 'role' and 'content'", param=param)
        role = m.get("role")
        if role not in ROLES:
            why = ": this server has no tools" if role in ("tool", "function") else ""
            raise ApiError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}{why}", param=f"{param}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(f"{param} holds tool calls: this server has no tools", param=f"{param}.tool_calls")
        parts = _content(m.get("content"), role, param, limits)
        if role in ("system", "developer"):
            if turns:
                raise ApiError(f"{param}: a {role} message after the conversation began is not supported; put it "
                               f"first", param=param)
            system.append("".join(parts))
        elif role == "user" and turns and turns[-1][0] == "user":  # one turn: text joined on a new line
            prev = turns[-1][1]
            joint = (prev[-1] + "\n" + parts[0],) if isinstance(prev[-1], str) and isinstance(parts[0], str) else ()
            turns[-1][1] = prev[:-1] + joint + parts[1:] if joint else prev + parts
        elif role == "assistant" and (not turns or turns[-1][0] != "user"):
            raise ApiError(f"{param}: an assistant message must answer a user message", param=param)
        else:
            turns.append([role, parts])
    if not turns or turns[-1][0] != "user":
        raise ApiError("the last message must be the user's: this server answers a user message", param="messages")
    history = [(Turn("user", u), "".join(a)) for (_, u), (_, a) in zip(turns[:-1:2], turns[1::2])]
    return ChatRequest(system="\n\n".join(system) if system else None, history=history,
                       turn=Turn("user", turns[-1][1]), max_tokens=max_tokens, temperature=temperature, seed=seed,
                       stop=stop, stream=bool(stream), include_usage=bool(options.get("include_usage")))


def _content(content, role: str, param: str, limits: Limits) -> tuple:
    """A message's parts: text, and for the user's, 16 kHz sample arrays."""
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list) or not content:
        raise ApiError(f"{param}.content must be a string or a non-empty list of content parts", param=f"{param}.content")
    parts = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(f"{where}.text must be a string", param=f"{where}.text")
            parts.append(part["text"])
        elif kind == "input_audio" and role == "user":
            parts.append(_input_audio(part.get("input_audio"), f"{where}.input_audio", limits))
        elif kind == "input_audio":
            raise ApiError(f"{where}: only user messages can hold audio", param=f"{where}.type")
        else:
            raise ApiError(f"{where}.type {kind!r} is not supported: content parts are 'text'"
                           f"{' and input_audio' if role == 'user' else ''}", param=f"{where}.type",
                           code="unsupported_content_part")
    return tuple(parts)


def _input_audio(obj, param: str, limits: Limits):
    if not isinstance(obj, dict):
        raise ApiError(f"{param} must be an object with 'data' (base64) and 'format'", param=param)
    fmt = obj.get("format")
    if fmt not in AUDIO_FORMATS:
        raise ApiError(f"{param}.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}", param=f"{param}.format")
    data = obj.get("data")
    if not isinstance(data, str):
        raise ApiError(f"{param}.data must be a base64 string", param=f"{param}.data")
    if data.startswith("data:") and "," in data:  # a data URL: data:audio/wav;base64,...
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{param}.data is not valid base64", param=f"{param}.data", code="invalid_base64") from None
    return decode_audio(raw, f"{param}.data", limits, fmt)


def decode_audio(raw: bytes, param: str, limits: Limits, fmt: str | None = None):
    """16 kHz samples of an audio file's bytes; what cannot be used (not audio, empty, silent, too long) is a 400."""
    import soundfile

    if fmt == "mp3" and "MP3" not in soundfile.available_formats():
        raise ApiError(f"mp3 audio needs libsndfile 1.1 or newer, this one is {soundfile.__libsndfile_version__}: "
                       f"send wav, flac or ogg", param=param, code="unsupported_audio_format")
    try:  # the length from the header, before decoding what may be a long file
        seconds = soundfile.info(io.BytesIO(raw)).duration
    except Exception:  # no header soundfile knows: load_audio says so
        seconds = 0.0
    if seconds <= limits.max_audio_seconds:
        try:
            samples = load_audio(raw)
        except AudioError as e:
            raise ApiError(str(e), param=param, code="invalid_audio") from None
        seconds = samples.size / SAMPLE_RATE
    if seconds > limits.max_audio_seconds:
        raise ApiError(f"the audio is {seconds:.1f} s long, this server takes clips of at most "
                       f"{limits.max_audio_seconds:g} s (llasm-serve --max-audio-seconds)", param=param,
                       code="audio_too_long")
    return samples


def usage(reply: Reply, audio_tokens: int) -> dict:
    return {"prompt_tokens": reply.prompt_positions, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_positions + reply.tokens,
            "prompt_tokens_details": {"cached_tokens": reply.prompt_positions - reply.prefilled,
                                      "audio_tokens": audio_tokens}}


def finish_reason(reply: Reply) -> str:
    return "length" if reply.finish == "length" else "stop"


def timings(reply: Reply) -> dict:
    """ms, as llasm-local --json gives them (llama.cpp's server adds its own "timings" too)."""
    return {k: round(v, 2) for k, v in reply.timings.items()}


def completion(cid: str, created: int, model: str, reply: Reply, audio_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "heard": reply.heard},
                         "logprobs": None, "finish_reason": finish_reason(reply)}],
            "usage": usage(reply, audio_tokens), "timings": timings(reply)}


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def usage_chunk(cid: str, created: int, model: str, reply: Reply, audio_tokens: int) -> dict:
    """The last chunk where stream_options.include_usage asks for it: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(reply, audio_tokens)}


def transcript(text: str, fmt: str, seconds: float, language: str | None):
    """The body of a transcription: an object, or the text itself (fmt "text")."""
    if fmt == "text":
        return text
    if fmt == "json":
        return {"text": text, "usage": {"type": "duration", "seconds": round(seconds, 3)}}
    return {"task": "transcribe", "language": language, "duration": round(seconds, 3), "text": text,
            "segments": [{"id": 0, "start": 0.0, "end": round(seconds, 3), "text": text}],
            "usage": {"type": "duration", "seconds": round(seconds, 3)}}
