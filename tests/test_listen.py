"""Listening ahead (Chat.listen): rows encoded and prefilled while the audio comes, the answer keeps that head start."""
import contextlib

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import tiny  # noqa: E402
from test_chat import _cache_matches_history  # noqa: E402
import llasm.runtime.chat as chat_module  # noqa: E402
from llasm.runtime.audio import AudioError  # noqa: E402
from llasm.runtime.chat import LLaSM, Reply  # noqa: E402
from llasm.runtime.listen import ListenedEncoder, listened_rows  # noqa: E402

SR = 16_000


@pytest.fixture(scope="module")
def model(bundle):
    m = LLaSM.load(bundle)
    yield m
    m.close()


def heard(listener, x, block):
    """Feed x in blocks, letting every pass run before the next block."""
    for i in range(0, x.size, block):
        listener.feed(x[i:i + block])
        assert listener.wait(timeout=60)


def answer(listener, **kw):
    reply = Reply("")
    text = "".join(listener.answer(max_tokens=4, _reply=reply, **kw))
    return text, reply


@pytest.mark.parametrize("context", [2, 1000])
def test_kept_rows_come_from_the_first_pass_that_sees_lookahead_rows_past_them(model, context):
    step, look = 3, 2
    x = tiny.speech(2.3, seed=3)
    lis = model.chat().listen(trim=False, step_rows=step, context_rows=context, lookahead_rows=look)
    heard(lis, x, block=517)
    kept = lis.passes.k
    assert kept > step and lis.rows_ahead == 1 + kept  # the begin-of-audio row, then the kept ones
    answer(lis)
    got = lis.chat.exchanges[-1].rows[0]
    row, enc = model.encoder.geometry.samples_per_row, model.encoder
    want = [enc(x)[:1]]  # begin-of-audio
    for k in range(0, kept, step):  # a pass every `step` rows, reaching `look` rows past the ones it keeps
        s = max(0, k - context)
        want.append(enc(x[s * row: (k + step + look) * row])[1 + k - s: 1 + k - s + step])
    k = min(kept, x.size // row - look)
    s = max(0, k - context)
    want.append(enc(x[s * row:])[1 + k - s:])  # the last pass: the rest, and end-of-audio
    want = np.concatenate(want)
    assert got.shape == enc(x).shape
    np.testing.assert_array_equal(got, want)
    again = listened_rows(enc, x, step_rows=step, context_rows=context, lookahead_rows=look)  # llasm-eval --listen
    np.testing.assert_array_equal(again, want)


def test_rows_do_not_depend_on_how_the_audio_arrives(model):
    x = np.concatenate([np.zeros(int(0.6 * SR), np.float32), tiny.speech(2.0, seed=4)])
    rows = []
    for block, channels in ((x.size, 1), (160, 1), (2999, 1), (1024, 2)):
        lis = model.chat().listen(step_rows=3, context_rows=4, lookahead_rows=2)
        heard(lis, x if channels == 1 else np.stack([x, x], axis=1), block)  # (frames, channels) are mixed down
        assert lis.rows_ahead > 0
        answer(lis)
        rows.append(lis.chat.exchanges[-1].rows[0])
    for r in rows[1:]:
        np.testing.assert_array_equal(r, rows[0])
    lis = model.chat().listen()
    with pytest.raises(ValueError, match=r"must be \(n,\) or \(n, channels\)"):
        lis.feed(np.zeros((2, 2, 2), np.float32))
    lis.cancel()


def test_the_answer_keeps_the_head_start_and_equals_answering_the_same_rows_at_once(model, bundle):
    chat = model.chat()
    chat.send(text="hello", max_tokens=3)
    lis = chat.listen(step_rows=3, context_rows=4, lookahead_rows=2)
    x = np.concatenate([np.zeros(int(0.5 * SR), np.float32), tiny.speech(2.0, seed=5)])
    heard(lis, x, block=1600)
    text, reply = answer(lis, text="and then?")
    turn, rows = chat.exchanges[-1].user, chat.exchanges[-1].rows
    feed = chat.feed(turn, rows)
    assert lis.rows_ahead > 0 and isinstance(feed[1], np.ndarray)
    header = len(feed[0])  # the user turn's markup
    assert not lis.answered_ahead and reply.prefilled == sum(map(len, feed)) - header - lis.rows_ahead
    _cache_matches_history(model, chat)
    assert reply.audio_seconds == pytest.approx(turn.parts[0].size / SR)

    fresh = LLaSM.load(bundle)  # the same history and rows, prefilled at once
    again = fresh.chat()
    again.send(text="hello", max_tokens=3)
    want = "".join(again.respond(turn, rows, max_tokens=4))
    assert text == want
    fresh.close()


def test_cancel_and_a_silent_turn_leave_the_conversation_as_it_was(model):
    chat = model.chat()
    chat.send(text="hello", max_tokens=3)
    before = (len(chat.exchanges), model.kv.size)
    lis = chat.listen(step_rows=3, context_rows=4, lookahead_rows=2)
    heard(lis, np.concatenate([np.zeros(SR // 2, np.float32), tiny.speech(1.5, seed=6)]), block=4000)
    assert lis.rows_ahead > 0 and model.kv.size > before[1]
    lis.cancel()
    assert (len(chat.exchanges), model.kv.size) == before and model.kv.holds(chat.history())

    lis = chat.listen()
    heard(lis, np.zeros(2 * SR, np.float32), block=4000)
    with pytest.raises(AudioError, match="heard no speech"):
        answer(lis)
    assert (len(chat.exchanges), model.kv.size) == before and model.kv.holds(chat.history())
    with pytest.raises(RuntimeError, match="answered already"):
        answer(lis)
    assert chat.send(text="still here", max_tokens=2).tokens == 2
    _cache_matches_history(model, chat)


def test_another_chat_in_between_costs_the_head_start_not_the_answer(model, bundle):
    x = tiny.speech(1.5, seed=7)
    a = model.chat()
    lis = a.listen(trim=False, step_rows=3, context_rows=4, lookahead_rows=2)
    heard(lis, x, block=4000)
    model.chat().send(text="something else entirely", max_tokens=3)  # the KV cache no longer holds a's rows
    text, _ = answer(lis)
    _cache_matches_history(model, a)

    fresh = LLaSM.load(bundle)
    b = fresh.chat()
    lis = b.listen(trim=False, step_rows=3, context_rows=4, lookahead_rows=2)
    heard(lis, x, block=4000)
    assert answer(lis)[0] == text
    fresh.close()


def test_a_listened_encoder_gives_a_chat_the_rows_a_listener_would(bundle):
    model = LLaSM.load(bundle)
    x = tiny.speech(2.5, seed=8)
    want = listened_rows(model.encoder, x, step_rows=3, context_rows=2, lookahead_rows=2)
    assert not np.array_equal(want, model.encoder(x))  # passes without all their right context: not the whole clip's
    model.encoder = ListenedEncoder(model.encoder, step_rows=3, context_rows=2, lookahead_rows=2)
    chat = model.chat()
    chat.send(audio=x, max_tokens=2)
    np.testing.assert_array_equal(chat.exchanges[-1].rows[0], want)
    with pytest.raises(ValueError, match="step_rows must be >= 1"):
        ListenedEncoder(model.encoder.encoder, step_rows=0)
    model.close()


@contextlib.contextmanager
def sampled():
    """The logits that tokens are sampled from inside the block, in order."""
    seen, sample = [], chat_module._sample
    chat_module._sample = lambda z, *a: (seen.append(z.copy()), sample(z, *a))[1]
    try:
        yield seen
    finally:
        chat_module._sample = sample


def same_as_at_once(bundle, history, chat, text, logits=None):
    """chat's last answer is what a fresh model answers for the same history, turn and rows, prefilled at once
    (logits: those its first token was sampled from, compared too)."""
    fresh = LLaSM.load(bundle)
    again = fresh.chat()
    for t in history:
        again.send(text=t, max_tokens=3)
    ex = chat.exchanges[-1]
    with sampled() as seen:
        assert "".join(again.respond(ex.user, ex.rows, max_tokens=4)) == text
    if logits is not None:
        np.testing.assert_allclose(logits, seen[0], atol=1e-4)
    fresh.close()


def paused_turn(chat):
    """A listener that heard speech and then a pause: the whole turn is in the KV cache."""
    lis = chat.listen(step_rows=3, context_rows=4, lookahead_rows=2)
    speech = np.concatenate([np.zeros(SR // 2, np.float32), tiny.speech(1.5, seed=9)])
    heard(lis, np.concatenate([speech, np.zeros(int(0.6 * SR), np.float32)]), block=1600)
    assert lis.answered_ahead
    return lis


def test_a_pause_after_speech_prefills_the_whole_turn_before_the_end(model, bundle, monkeypatch):
    chat = model.chat()
    chat.send(text="hello", max_tokens=3)
    lis = paused_turn(chat)
    passes = []
    final = lis.passes.final
    monkeypatch.setattr(lis.passes, "final", lambda *a: (passes.append(a), final(*a))[1])
    with sampled() as seen:
        text, reply = answer(lis)
    assert reply.prefilled == 0 and passes == []  # no encoder pass, no decode: the guess's last decode has the logits
    assert reply.audio_seconds == pytest.approx(1.9)  # the speech and its trim margins (0.2 s each side)
    _cache_matches_history(model, chat)
    same_as_at_once(bundle, ["hello"], chat, text, logits=seen[0])


def test_after_a_pause_logits_overwritten_since_are_computed_again(model, bundle):
    """The KV cache still holds the turn, but llama.cpp's logits are another decode's: the last position is
    decoded again."""
    chat = model.chat()
    chat.send(text="hello", max_tokens=3)
    lis = paused_turn(chat)
    llm = model.llm
    n = llm.n_past
    llm.eval_tokens(llm.tokenize("Something else"))
    llm.truncate(n)
    with sampled() as seen:
        text, reply = answer(lis)
    assert reply.prefilled == 1
    same_as_at_once(bundle, ["hello"], chat, text, logits=seen[0])


def test_speech_after_a_pause_goes_on_where_the_passes_stopped(model, bundle):
    chat = model.chat()
    lis = chat.listen(step_rows=3, context_rows=4, lookahead_rows=2)
    pause = np.concatenate([np.zeros(SR // 2, np.float32), tiny.speech(1.0, seed=10), np.zeros(SR // 2, np.float32)])
    heard(lis, pause, block=1600)
    assert lis.answered_ahead
    heard(lis, tiny.speech(1.5, seed=11), block=1600)
    assert not lis.answered_ahead and lis.passes.k > 0
    text, reply = answer(lis)
    assert reply.audio_seconds > 2.5
    _cache_matches_history(model, chat)
    same_as_at_once(bundle, [], chat, text)


def test_without_rows_tied_to_time_the_answer_does_it_all_as_chat_send_does(bundle):
    """The query adaptor's rows are not stretches of audio: no worker, no head start, the whole clip at the end."""
    import dataclasses

    model = LLaSM.load(bundle)
    x = tiny.speech(2.5, seed=12)
    want = model.chat().send(audio=x, max_tokens=4).text
    model.encoder.geometry = dataclasses.replace(model.encoder.geometry, fixed_rows=4, rows="queries")
    lis = model.chat().listen(trim=False, step_rows=3, context_rows=2, lookahead_rows=2)
    heard(lis, x, block=4000)  # wait() returns: nothing is listening ahead
    assert lis.rows_ahead == 0 and lis._worker is None
    assert answer(lis)[0] == want
    model.close()
