"""llasm-serve: the OpenAI API over the tiny whisper-decoder bundle, served by uvicorn on a free localhost port (in a
thread, always stopped), talked to with the official openai client and with raw HTTP."""
import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")
sf = pytest.importorskip("soundfile")

import tiny  # noqa: E402
from llasm.runtime.chat import LLaSM, Reply  # noqa: E402
from llasm.runtime.prompt import Turn  # noqa: E402
from llasm.runtime.serve.api import Limits  # noqa: E402
from llasm.runtime.serve.app import bind, create_app, server  # noqa: E402
from llasm.runtime.serve.engine import Engine  # noqa: E402

KEY = "test-key"
MODEL = "tiny"
N_CTX = 1024
MAX_BODY = 1 << 20
LIMITS = Limits(max_audio_seconds=10.0, max_tokens=8)


class Served:
    """The app on a free port, in a thread; close() stops it."""

    def __init__(self, bundle):
        self.model = LLaSM.load(bundle, n_ctx=N_CTX, rows_cache=8)
        self.engine = Engine(self.model)
        app = create_app(self.engine, MODEL, api_key=KEY, limits=LIMITS, max_body=MAX_BODY)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()
        self.model.close()
        assert not self.thread.is_alive()

    def request(self, method, path, body=b"", headers=None, key=KEY, timeout=60):
        """(status, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = {"Authorization": f"Bearer {key}"} if key else {}
            if isinstance(body, (dict, list)):
                body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
            conn.request(method, path, body=body, headers={**h, **(headers or {})})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode("utf-8", "replace")

    def health(self) -> dict:
        status, body = self.request("GET", "/health", key=None)
        assert status == 200
        return body


@pytest.fixture(scope="module")
def served(whisper_decoder_bundle):
    s = Served(whisper_decoder_bundle)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def reference(whisper_decoder_bundle):
    """The same bundle in this process: what a request gives served alone."""
    m = LLaSM.load(whisper_decoder_bundle, n_ctx=N_CTX)
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key=KEY, max_retries=0, timeout=60)


SAMPLED = {"temperature": 1.5}  # with a seed: the tiny random LLM says "\n" over and over when greedy
SUBTYPES = {"WAV": "FLOAT", "FLAC": "PCM_24", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def wav(x, rate=16000, subtype=None, fmt="WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, subtype=subtype or SUBTYPES[fmt], format=fmt)
    return buf.getvalue()


def audio_part(x, fmt="wav") -> tuple[dict, np.ndarray]:
    """An input_audio part of x as a file of that format, and the samples the server decodes from it."""
    from llasm.runtime.audio import load_audio

    data = wav(x, fmt=fmt.upper())
    return ({"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}},
            load_audio(data))


def answer_alone(model, turn, system=None, history=(), **kw) -> Reply:
    reply = Reply("")
    "".join(model.chat(system=system, history=history, drop_oldest=False).ask(turn, reply=reply, **kw))
    return reply


def test_the_server_imports_no_torch():
    code = ("import sys, llasm.runtime.serve.app, llasm.runtime.serve.engine, llasm.cli.serve; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_audio_and_text_chat_through_the_openai_client(client, reference):
    part, x = audio_part(tiny.speech(1.2, seed=9))
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [part, {"type": "text", "text": "What was said?"}]}]
    want = answer_alone(reference, Turn("user", (x, "What was said?")), system="You are terse.", max_tokens=6,
                        seed=3, **SAMPLED)
    assert want.heard and want.audio_rows > 0 and want.text.strip()

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=3, **SAMPLED)
    choice = r.choices[0]
    assert (r.object, r.model, choice.message.role) == ("chat.completion", MODEL, "assistant")
    assert choice.message.content == want.text and choice.message.model_extra["heard"] == want.heard
    assert choice.finish_reason == ("length" if want.finish == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_positions, want.tokens)
    assert r.usage.prompt_tokens_details.audio_tokens == want.audio_rows

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, seed=3,
                                                 stream=True, stream_options={"include_usage": True}, **SAMPLED))
    first, *_, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.model_extra["heard"] == want.heard
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert last.choices == [] and last.usage.prompt_tokens == want.prompt_positions
    assert all(c.id == first.id and c.object == "chat.completion.chunk" for c in chunks)


def test_a_conversation_with_audio_in_earlier_turns(client, reference):
    """Earlier user turns with audio and the assistant's answers reach the LLM as the history they were."""
    (xp, x), (yp, y) = audio_part(tiny.speech(1.0, seed=4)), audio_part(tiny.speech(1.1, seed=2), fmt="flac")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Listen:"}, xp]},
                {"role": "assistant", "content": "I heard you."},
                {"role": "user", "content": [yp]},
                {"role": "user", "content": "and now?"}]  # two user messages in a row: one turn
    want = answer_alone(reference, Turn("user", (y, "and now?")), max_tokens=5, seed=2,
                        history=[(Turn("user", ("Listen:", x)), "I heard you.")], **SAMPLED)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, seed=2, **SAMPLED)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_positions
    assert r.usage.prompt_tokens_details.audio_tokens > want.audio_rows  # the history's clip counts too


def test_transcription_through_the_openai_client(client, reference):
    from llasm.runtime.audio import load_audio

    x = tiny.speech(1.0, seed=2)
    want = reference.transcribe(x)
    data = wav(x)
    assert client.audio.transcriptions.create(model=MODEL, file=("q.wav", data, "audio/wav")).text == want
    text = client.audio.transcriptions.create(model=MODEL, file=("q.wav", data), response_format="text")
    assert text.strip() == want.strip()
    mp3 = "MP3" in sf.available_formats()  # libsndfile 1.1 and later
    other = wav(x, fmt="MP3" if mp3 else "OGG")
    v = client.audio.transcriptions.create(model=MODEL, file=("q.mp3" if mp3 else "q.ogg", other),
                                           response_format="verbose_json", language="en")
    decoded = load_audio(other)
    assert v.text == reference.transcribe(decoded)
    assert v.language == "en" and abs(v.duration - decoded.size / 16000) < 1e-3


def test_errors_through_the_openai_client(client, served):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}}]}])
    assert e.value.status_code == 400
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == "messages[0].content[0].type" and "'image_url' is not supported" in err["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.response.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client.models.list().data] == [MODEL] and client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert served.health()["status"] == "ok"


def test_a_conversation_that_goes_on_computes_only_its_new_turn(served, client, reference, whisper_decoder_bundle):
    """The second request of a conversation (its first turn, with audio, and the answer, sent again) computes only
    what the KV cache did not hold after the first, encodes no audio, and its first token's logits are those of
    its whole prompt computed at once."""
    from test_listen import sampled

    from llasm.runtime.kv import common_prefix, keys, size
    from llasm.runtime.llm import LLM

    part, x = audio_part(tiny.speech(1.2, seed=9))
    first = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
    a1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=4).choices[0].message.content
    lived = reference.chat()  # the conversation as the server's KV cache holds it now: the answer's own tokens
    assert "".join(lived.ask(Turn("user", (x, "What is it?")), max_tokens=4)) == a1
    held = [k for item in lived.history() for k in keys(item)]
    sent = reference.chat(history=[(Turn("user", (x, "What is it?")), a1)])  # as the client sends it again
    prompt = sent.history() + sent.feed(Turn("user", ("And why?",)), [])
    want = size(prompt) - common_prefix(held, prompt)

    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And why?"}]
    computed, encoded = served.model.kv.computed, served.model.kept.misses
    with sampled() as seen:
        r = client.chat.completions.create(model=MODEL, messages=second, max_tokens=3)
    assert served.model.kept.misses == encoded  # the clip's rows were kept
    assert r.usage.prompt_tokens == size(prompt) and r.usage.prompt_tokens_details.cached_tokens == size(prompt) - want
    end = reference.llm.tokenize(reference.bundle.prompt.end_of_turn)
    assert r.choices[0].finish_reason == "length"  # so every answer token was fed, then the end of the turn
    assert served.model.kv.computed - computed == want + r.usage.completion_tokens + len(end)
    assert size(prompt) - want >= size(sent.history()[:3])  # at least bos, system, the first turn and its audio
    fresh = LLM(read_llm(whisper_decoder_bundle), n_ctx=N_CTX)
    fresh.eval(prompt)
    np.testing.assert_allclose(seen[0], fresh.logits(), atol=1e-4)
    fresh.close()


def read_llm(bundle):
    from llasm.runtime.bundle import read_bundle

    return read_bundle(bundle).llm


def test_a_client_that_leaves_mid_stream_cancels_its_answer(served, reference, monkeypatch):
    import llasm.runtime.chat as chat_module

    sampled, sample = [], chat_module._sample

    def slow(*a):  # a token every 10 ms: the answer outlasts the client
        sampled.append(1)
        time.sleep(0.01)
        return sample(*a)

    monkeypatch.setattr(chat_module, "_sample", slow)
    before = served.health()["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}], "stream": True,
            "max_tokens": 300, "seed": 4, **SAMPLED}  # seed 4: 300 tokens and no end of turn, served alone
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    contents = 0
    while contents < 3:
        line = r.fp.readline()
        assert line, "the stream ended before the client left"
        contents += line.startswith(b"data: ") and b'"content"' in line
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while served.health()["cancelled"] == before:
        assert time.monotonic() < deadline, "the answer was not cancelled"
        time.sleep(0.05)
    assert len(sampled) < 200  # it stopped soon after the client left, not at max_tokens
    monkeypatch.setattr(chat_module, "_sample", sample)
    status, out = served.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert status == 200
    assert out["choices"][0]["message"]["content"] == answer_alone(reference, Turn("user", ("hello",)),
                                                                   max_tokens=4).text


def test_eight_clients_at_once_each_get_the_answer_they_get_alone(served, client):
    requests = []
    for i in range(8):
        parts = [{"type": "text", "text": f"question {i}: what is it?"}]
        if i % 2 == 0:
            parts.insert(0, audio_part(tiny.speech(0.8 + 0.1 * i, seed=i))[0])
        requests.append({"messages": [{"role": "user", "content": parts}], "max_tokens": 6, "seed": i, **SAMPLED})

    def ask(req):
        r = client.chat.completions.create(model=MODEL, **req)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens

    alone = [ask(req) for req in requests]
    start = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda req: (start.wait(30), ask(req))[1], requests))
    assert together == alone and len({a[0] for a in alone}) >= 6  # (answers that differ: a test that can fail)
    assert served.health()["waiting"] == 0


def long_wav_b64(seconds):
    return base64.b64encode(wav(tiny.speech(seconds, rate=8000, seed=1), rate=8000, subtype="PCM_16")).decode()


def chat_body(*parts, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2, **kw}


def input_audio(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def multipart(fields: dict, file: bytes | None = None, boundary="llasmtestboundary"):
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    if file is not None:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                f'Content-Type: audio/wav\r\n\r\n').encode() + file + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


CHAT = "/v1/chat/completions"
TRANSCRIBE = "/v1/audio/transcriptions"
SILENT = base64.b64encode(wav(np.zeros(16000, np.float32))).decode()
BAD_INPUT = {  # name: (method, path, body, headers, status, code, what the message says)
    "malformed JSON": ("POST", CHAT, b'{"messages": [', None, 400, "invalid_json", "not valid JSON"),
    "not an object": ("POST", CHAT, [1, 2], None, 400, None, "must be a JSON object"),
    "no messages": ("POST", CHAT, {"model": MODEL}, None, 400, None, "'messages' must be"),
    "bad base64": ("POST", CHAT, chat_body(input_audio("@@not base64@@")), None, 400, "invalid_base64", "base64"),
    "audio that is no audio": ("POST", CHAT, chat_body(input_audio(base64.b64encode(b"plain text, no sound").decode())),
                               None, 400, "invalid_audio", "cannot read audio"),
    "empty audio": ("POST", CHAT, chat_body(input_audio("")), None, 400, "invalid_audio", "empty"),
    "silent audio": ("POST", CHAT, chat_body(input_audio(SILENT)), None, 400, "invalid_audio", "silent"),
    "unknown audio format": ("POST", CHAT, chat_body(input_audio(SILENT, "m4a")), None, 400, None, "format must be"),
    "oversized body": ("POST", CHAT, chat_body({"type": "text", "text": "x" * (MAX_BODY + 10)}), None, 413,
                       "request_too_large", "over 1 MiB"),
    "oversized chunked body": ("POST", CHAT, iter([b"{" + b" " * 65536] * 24), {"Content-Type": "application/json"},
                               413, "request_too_large", "over 1 MiB"),
    "audio over the length limit": ("POST", CHAT, chat_body(input_audio(long_wav_b64(12.0))), None, 400,
                                    "audio_too_long", "12.0 s long"),
    "unknown content part": ("POST", CHAT, chat_body({"type": "video", "video": {}}), None, 400,
                             "unsupported_content_part", "'video' is not supported"),
    "tool message": ("POST", CHAT, {"messages": [{"role": "tool", "content": "42"}]}, None, 400, None, "no tools"),
    "negative max_tokens": ("POST", CHAT, chat_body({"type": "text", "text": "hi"}, max_tokens=-1), None, 400,
                            None, "at least 1"),
    "context overflow": ("POST", CHAT, chat_body({"type": "text", "text": "the quick brown fox " * 600}), None, 400,
                         "context_length_exceeded", "the context holds 1024"),
    "ends with the assistant": ("POST", CHAT, {"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]},
                                None, 400, None, "last message must be the user's"),
    "no API key": ("POST", CHAT, chat_body({"type": "text", "text": "hi"}), {"Authorization": ""}, 401,
                   "invalid_api_key", "API key"),
    "unknown path": ("GET", "/v1/engines", b"", None, 404, "not_found", "Not Found"),
    "wrong method": ("GET", CHAT, b"", None, 405, None, "Method Not Allowed"),
    "transcription not multipart": ("POST", TRANSCRIBE, {"file": "x"}, None, 400, None, "multipart/form-data"),
    "transcription without file": ("POST", TRANSCRIBE, *multipart({"model": MODEL}), 400, None, "no 'file'"),
    "transcription of no audio": ("POST", TRANSCRIBE, *multipart({"model": MODEL}, b"RIFF....nonsense"), 400,
                                  "invalid_audio", "cannot read audio"),
    "transcription as srt": ("POST", TRANSCRIBE, *multipart({"response_format": "srt"}, wav(tiny.speech(1.0))), 400,
                             None, "response_format must be"),
    "transcription in French": ("POST", TRANSCRIBE, *multipart({"language": "fr"}, wav(tiny.speech(1.0))), 400,
                                None, "this bundle hears en, zh"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_an_error_object_and_the_server_goes_on(served, reference, name):
    method, path, body, headers, status, code, says = BAD_INPUT[name]
    got, out = served.request(method, path, body, headers=headers)
    assert got == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert says in err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    assert err["type"] == "invalid_request_error"
    assert_still_answers(served, reference)


def test_unknown_top_level_fields_are_ignored(served, reference):
    body = chat_body({"type": "text", "text": "hello"}, max_tokens=4, top_p=0.5, user="someone",
                     frobnicate={"a": 1}, logit_bias={}, parallel_tool_calls=False)
    status, out = served.request("POST", CHAT, body)
    assert status == 200 and out["choices"][0]["message"]["content"] == answer_alone(
        reference, Turn("user", ("hello",)), max_tokens=4).text


def test_a_server_error_is_a_500_with_a_message_and_the_next_request_is_answered(served, reference, monkeypatch):
    def broken(turn):
        raise RuntimeError("the encoder broke\nsecond line")

    monkeypatch.setattr(served.model, "encode", broken)
    status, out = served.request("POST", CHAT, chat_body({"type": "text", "text": "hi"}))
    assert status == 500 and out["error"]["type"] == "server_error"
    assert out["error"]["message"] == "internal error: RuntimeError: the encoder broke"
    monkeypatch.undo()
    assert_still_answers(served, reference)


def assert_still_answers(served, reference):
    assert served.health()["status"] == "ok"
    status, out = served.request("POST", CHAT, chat_body({"type": "text", "text": "hi"}, max_tokens=3))
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == answer_alone(reference, Turn("user", ("hi",)), max_tokens=3).text


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llasm.cli.serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
    r = run_cli("--bundle", str(tmp_path / "nope"), "--port", "0")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"llasm-serve: error: bundle not found: {tmp_path / 'nope'} is not a directory"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_cli("--bundle", str(tmp_path), "--port", str(taken.getsockname()[1]))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("llasm-serve: error: ") and "in use" in lines[0]


def test_the_command_serves_a_bundle_until_interrupted(whisper_decoder_bundle):
    import signal

    p = subprocess.Popen([sys.executable, "-m", "llasm.cli.serve", "--bundle", str(whisper_decoder_bundle),
                          "--port", "0", "--api-key", KEY, "--n-ctx", "512"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [p.stderr.readline()]  # notes first (llama.cpp's CPU check), at INFO: a server shows what it does
        while not lines[-1].startswith("llasm-serve: serving") and lines[-1] and len(lines) < 20:
            lines.append(p.stderr.readline())
        line = lines[-1]
        assert line.startswith("llasm-serve: serving wd at http://127.0.0.1:"), lines
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body({"type": "text", "text": "hi"})),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["role"] == "assistant"
        conn.close()
        p.send_signal(signal.SIGINT)
        assert p.wait(30) in (0, 130)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_full_queue_is_a_503_not_a_wait(served):
    """Past max_queue requests waiting, a request is refused at once (the worker here is held by the first)."""
    from llasm.runtime.serve.api import ChatRequest
    from llasm.runtime.serve.engine import Busy

    engine = Engine(served.model, max_queue=1)
    held, events = threading.Event(), []
    try:
        request = ChatRequest(system=None, history=[], turn=Turn("user", ("hi",)), max_tokens=2, temperature=0.0)
        engine.chat(request, lambda e: (events.append(e), held.wait(30)))
        with pytest.raises(Busy) as e:
            engine.chat(request, events.append)
        assert e.value.status == 503 and e.value.code == "server_busy" and engine.waiting == 1
    finally:
        held.set()
        engine.close()
    assert events[-1][0] == "done" and engine.served == 1 and engine.waiting == 0
