"""Conversation state: context overflow drops the oldest turns, abandoned or cancelled streams stay consistent."""
import struct
import threading

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

import tiny  # noqa: E402
from llasm.runtime.chat import LLaSM  # noqa: E402
from llasm.runtime.kv import KVLedger  # noqa: E402
from llasm.runtime.llm import LLM, ContextFull  # noqa: E402
from llasm.runtime.token_rows import TokenRows, TokenRowsError  # noqa: E402


def _cache_matches_history(model, chat):
    """The KV cache holds exactly the chat's history, and a fresh replay of it gives the same logits."""
    assert model.kv.holds(chat.history())
    fresh = LLM(model.bundle.llm, n_ctx=model.llm.n_ctx)
    for f in chat.history():
        (fresh.eval_embeddings if isinstance(f, np.ndarray) else fresh.eval_tokens)(f)
    np.testing.assert_allclose(fresh.logits(), model.llm.logits(), atol=1e-4)
    fresh.close()


def test_overflow_drops_the_oldest_turns(bundle):
    model = LLaSM.load(bundle, n_ctx=256)
    chat = model.chat()
    for i in range(6):
        chat.send(audio=tiny.speech(1.5, seed=i), text=f"turn {i}", max_tokens=24)
    assert chat.dropped > 0
    assert len(chat.exchanges) == 6 - chat.dropped
    kept_first = chat.exchanges[0].user.parts[-1]
    assert kept_first == f"turn {chat.dropped}"
    _cache_matches_history(model, chat)
    model.close()


def test_a_turn_larger_than_the_context_is_refused_and_changes_nothing(bundle):
    model = LLaSM.load(bundle, n_ctx=128)
    chat = model.chat()
    chat.send(text="hi", max_tokens=3)
    before = (len(chat.exchanges), model.llm.n_past)
    with pytest.raises(ContextFull, match="the context holds"):
        chat.send(audio=tiny.speech(12.0), max_tokens=3)
    assert (len(chat.exchanges), model.llm.n_past) == before
    assert chat.send(text="still here", max_tokens=2).tokens == 2
    model.close()


def test_abandoned_stream_keeps_the_partial_answer(bundle):
    model = LLaSM.load(bundle)
    chat = model.chat()
    stream = chat.stream(text="tell me a long story", max_tokens=30)
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.exchanges[-1].text == "".join(got)
    _cache_matches_history(model, chat)
    assert chat.send(text="next", max_tokens=2).tokens == 2
    _cache_matches_history(model, chat)
    model.close()


def test_cancel_from_another_thread(bundle):
    from llasm.runtime.chat import Reply

    model = LLaSM.load(bundle)
    chat = model.chat()
    pieces, reply = [], Reply("")
    for piece in chat.stream(text="go on and on", max_tokens=200, _reply=reply):
        pieces.append(piece)
        if len(pieces) == 2:
            t = threading.Thread(target=chat.cancel)
            t.start()
            t.join()
    assert 2 <= len(pieces) <= 3 and reply.finish == "cancelled"
    _cache_matches_history(model, chat)
    model.close()


def test_two_chats_share_one_model(bundle):
    model = LLaSM.load(bundle)
    a, b = model.chat(), model.chat()
    ra = a.send(text="hello", max_tokens=4).text
    b.send(text="something else entirely", max_tokens=4)
    a2 = a.send(text="again", max_tokens=4)  # a's history is restored before its turn
    _cache_matches_history(model, a)
    solo = LLaSM.load(bundle).chat()
    assert solo.send(text="hello", max_tokens=4).text == ra
    assert solo.send(text="again", max_tokens=4).text == a2.text
    model.close()


def test_new_conversations_reuse_the_cached_system_prompt(bundle):
    model = LLaSM.load(bundle)
    header = model.llm.n_past
    assert header > 0  # bos + default system prompt prefilled at load
    chat = model.chat()
    x = tiny.speech(1.0)
    first = chat.send(audio=x, text="hi", max_tokens=3)
    _cache_matches_history(model, chat)
    chat.reset()
    again = chat.send(audio=x, text="hi", max_tokens=3)
    assert again.text == first.text
    _cache_matches_history(model, chat)
    other = model.chat(system="You are terse.")  # a different system prompt shares nothing but the start
    other.send(text="hi", max_tokens=2)
    _cache_matches_history(model, other)
    model.close()


def test_a_new_conversation_that_repeats_the_cached_one_is_answered(bundle, monkeypatch):
    """Every position of the first turn is already in the KV cache: its last one is computed again all the same,
    because the logits read next are those of the last decode (they used to be the previous answer's end; the
    release model then answered nothing)."""
    import llasm.runtime.chat as chat_module

    seen = []
    sample = chat_module._sample
    monkeypatch.setattr(chat_module, "_sample", lambda logits, *a: (seen.append(logits.copy()), sample(logits, *a))[1])
    model = LLaSM.load(bundle)
    chat = model.chat()
    first = chat.send(text="hi", max_tokens=4)
    chat.reset()
    again = chat.send(text="hi", max_tokens=4)
    assert again.text == first.text
    np.testing.assert_allclose(seen[4], seen[0], atol=1e-4)  # the first token's logits, both times
    _cache_matches_history(model, chat)
    model.close()


def test_the_llm_knows_whether_its_logits_are_those_of_its_last_position(bundle):
    model = LLaSM.load(bundle)
    llm = model.llm
    n = llm.n_past
    llm.eval_tokens(llm.tokenize("one two three"))
    assert llm.has_logits
    llm.truncate(llm.n_past)  # nothing removed
    assert llm.has_logits
    llm.truncate(llm.n_past - 1)
    assert not llm.has_logits  # the logits are those of the position just removed
    llm.eval_embeddings(np.zeros((2, llm.n_embd), np.float32))
    assert llm.has_logits
    llm.truncate(n)
    assert not llm.has_logits
    model.close()


def test_a_spoken_turn_is_one_decode_with_the_per_segment_result(bundle):
    model = LLaSM.load(bundle)
    llm, kv = model.llm, model.kv
    assert llm.token_rows is not None  # warm_up checked the GGUF's token rows against the token path
    head, tail = llm.tokenize("<|im_start|>user\n"), llm.tokenize("<|im_end|>\n<|im_start|>assistant\n")
    audio = model.encoder(tiny.speech(1.2))
    items = [head, audio, llm.tokenize("\nWhat is it?"), tail]
    start, decodes = kv.size, llm.decodes
    kv.extend(items)
    assert llm.decodes == decodes + 1
    assert kv.holds(kv.header + items)
    assert kv.common(kv.header + [head, audio[:2], llm.tokenize("Other")]) == start + len(head) + 2  # text fed as
    #                                                                      its token rows is still known by its ids
    fresh = LLM(model.bundle.llm, n_ctx=llm.n_ctx)  # no warm_up: no token rows, one decode per segment
    fresh_kv = KVLedger(fresh, header=kv.header)
    decodes = fresh.decodes
    fresh_kv.extend(items)
    assert fresh.decodes == decodes + 3  # adjacent token lists still go together
    assert fresh_kv.holds(kv.header + items)
    np.testing.assert_allclose(fresh.logits(), llm.logits(), atol=1e-4)
    fresh.close()
    model.close()


def test_the_audio_encoder_does_not_spin_after_a_run(bundle):
    """onnxruntime's workers spin after each run by default, on the cores llama.cpp's prefill needs next."""
    model = LLaSM.load(bundle)
    options = model.encoder.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    model.close()


def test_token_rows_that_change_the_logits_are_not_used(bundle, monkeypatch):
    monkeypatch.setattr(TokenRows, "rows", lambda self, ids: np.ones((len(ids), self.n_embd), np.float32))
    model = LLaSM.load(bundle)
    assert model.llm.token_rows is None
    reply = model.chat().send(audio=tiny.speech(1.0), text="hi", max_tokens=3)
    assert reply.tokens > 0
    model.close()


def test_a_file_without_token_rows_is_one_line_error(tmp_path):
    bad = tmp_path / "llm.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a valid header with no tensors
    with pytest.raises(TokenRowsError, match="no token_embd.weight tensor"):
        TokenRows(bad)
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenRowsError, match="not a GGUF file"):
        TokenRows(bad)


def test_a_new_chat_is_not_refused_for_another_chats_long_history(bundle):
    model = LLaSM.load(bundle, n_ctx=256)
    long = model.chat()
    while model.llm.n_past < 200:  # another conversation fills most of the context
        long.send(text="tell me more about it please", max_tokens=20)
    fresh = model.chat()
    assert fresh.send(text="hi", max_tokens=8).tokens == 8  # fits: the other chat's positions are not its own
    _cache_matches_history(model, fresh)
    assert long.send(text="and again", max_tokens=2).tokens == 2  # the first chat is restored for its turn
    _cache_matches_history(model, long)
    model.close()


def test_a_transcript_is_capped_by_the_length_of_its_audio(bundle, monkeypatch):
    from llasm.runtime import chat as chat_module

    model = LLaSM.load(bundle)
    caps = []
    send = chat_module.Chat.send
    monkeypatch.setattr(chat_module.Chat, "send", lambda self, **kw: caps.append(kw["max_tokens"]) or send(self, **kw))
    text = model.transcribe(tiny.speech(1.0))  # the tiny random LLM never stops on its own
    model.transcribe(tiny.speech(1.0), max_tokens=5)
    model.transcribe(tiny.speech(3.0))
    model.close()
    assert caps == [chat_module.TRANSCRIPT_TOKENS_PER_S + 16, 5, 3 * chat_module.TRANSCRIPT_TOKENS_PER_S + 16]
    assert isinstance(text, str)


def test_loop_excess_finds_the_repeated_tail():
    from llasm.runtime.loops import LOOP_MAX_BLOCK, LOOP_MIN_TOKENS, loop_excess

    assert loop_excess([7] * LOOP_MIN_TOKENS) == LOOP_MIN_TOKENS - 1  # one token said over and over: keep one
    assert loop_excess([7] * (LOOP_MIN_TOKENS - 1)) == 0  # too short to call a loop
    assert loop_excess([5, 6] + [1, 2, 3, 4, 9] * 3) == 10  # three copies of a 5-token block: keep the first
    assert loop_excess([1, 2, 3, 4, 9] * 2 + [1, 2, 3, 4]) == 0  # two copies and a bit
    assert loop_excess(list(range(40))) == 0
    assert loop_excess(list(range(LOOP_MAX_BLOCK)) * 3) == 2 * LOOP_MAX_BLOCK  # the longest block looked for
    assert loop_excess(list(range(LOOP_MAX_BLOCK + 1)) * 3) == 0  # longer blocks are not searched


def test_a_decoding_loop_stops_and_keeps_one_copy(bundle, monkeypatch):
    from llasm.runtime import chat as chat_module

    block = [11, 12, 13, 14, 15]
    script = iter([3, 4] + block * 10)
    monkeypatch.setattr(chat_module, "_sample", lambda logits, temperature, rng: next(script))
    model = LLaSM.load(bundle)
    chat = model.chat()
    streamed = "".join(chat.stream(text="say it again", max_tokens=40))
    reply = chat.exchanges[-1]
    want = b"".join(model.llm.piece(t) for t in [3, 4] + block).decode("utf-8", "replace")
    assert reply.text == want
    assert streamed.startswith(want) and len(streamed) > len(want)  # the stream showed repeats before the stop
    _cache_matches_history(model, chat)  # the KV cache keeps one copy too
    assert reply.reply[:len(block) + 2] == [3, 4] + block and len(reply.reply) < len(block) * 2 + 2

    script = iter([3, 4] + block * 10)
    again = model.chat().send(text="say it again", max_tokens=40)
    assert again.looped and again.text == want and again.tokens == len(block) + 2
    model.close()


def test_a_history_whose_turns_hold_audio_is_fed_as_the_conversation_had_it(bundle, tmp_path):
    """User turns of text and audio parts, in any order (a server's client sends such a conversation whole): the
    history is their rendered prompt with the clips' rows, the answers' tokens, and the KV cache holds it."""
    import soundfile as sf

    from llasm.runtime.audio import AudioError, load_audio
    from llasm.runtime.kv import size
    from llasm.runtime.prompt import Turn

    model = LLaSM.load(bundle)
    x, y = tiny.speech(1.1, seed=3), tiny.speech(0.8, seed=4)
    wav = tmp_path / "y.wav"
    sf.write(wav, y, 16000, subtype="FLOAT")
    history = [(Turn("user", (x, "what is it?")), "a fox"), ("and then?", "it ran"),
               (Turn("user", ("say it again:", wav)), "a fox ran")]
    chat = model.chat(history=history)
    llm, prompt = model.llm, model.bundle.prompt
    end = llm.tokenize(prompt.end_of_turn)
    want = []
    for i, (user, answer) in enumerate(history):
        turn = user if isinstance(user, Turn) else Turn("user", (user,))
        turn = Turn("user", tuple(p if isinstance(p, str) else load_audio(p) for p in turn.parts))
        for seg in prompt.render([turn], start=i == 0):
            want.append(model.encoder(seg.audio) if seg.is_audio else llm.tokenize(seg.text))
        want.append(llm.tokenize(answer, special=False) + end)
    got = chat.history()
    assert len(got) == len(want) and sum(isinstance(f, np.ndarray) for f in got) == 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    reply = chat.send(text="why?", max_tokens=3)
    assert reply.prompt_positions == size(chat.history()[:-1]) and reply.finish == "length"
    _cache_matches_history(model, chat)
    with pytest.raises(AudioError, match="silent"):
        model.chat(history=[(Turn("user", (np.zeros(16000, np.float32),)), "nothing")])
    with pytest.raises(ValueError, match="history holds"):
        model.chat(history=[(Turn("assistant", ("hi",)), "there")])
    model.close()


def test_kept_rows_spare_encoding_a_clip_again(bundle, monkeypatch):
    from llasm.runtime.prompt import Turn

    model = LLaSM.load(bundle, rows_cache=2)
    encoded = []
    encode = model.encoder.encode_heard
    monkeypatch.setattr(model.encoder, "encode_heard", lambda mels: encoded.append(1) or encode(mels))
    a, b, c = (tiny.speech(1.0, seed=i) for i in range(3))
    first = model.chat().send(audio=a, text="hi", max_tokens=3)
    again = model.chat(history=[(Turn("user", (a, "hi")), first.text)])  # as a server's client sends it next
    assert len(encoded) == 1 and again.exchanges[0].rows[0] is model.encode(Turn("user", (a,))).rows[0]
    second = model.chat().send(audio=a, text="hi", max_tokens=3)
    assert len(encoded) == 1 and second.text == first.text and second.timings["encode"] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        again.exchanges[0].rows[0][0, 0] = 1.0  # shared by every conversation holding the clip
    model.chat().send(audio=b, max_tokens=1)
    model.chat().send(audio=c, max_tokens=1)
    assert len(encoded) == 3 and len(model.kept) == 2 and model.kept.hits == 3
    model.chat().send(audio=a, text="hi", max_tokens=1)  # the oldest clip was let go
    assert len(encoded) == 4
    model.close()


def test_stop_strings_end_the_answer_and_never_show_in_the_stream(bundle):
    from llasm.runtime.chat import Reply

    model = LLaSM.load(bundle)
    kw = dict(text="tell me a story", max_tokens=16, temperature=1.5, seed=1)  # greedy, the tiny model loops at once
    full = model.chat().send(**kw)
    assert full.tokens == 16 and full.finish == "length" and len(full.text) > 8
    stop = full.text[4:7]
    cut = full.text.index(stop)
    reply = Reply("")
    pieces = list(model.chat().stream(stop=["never said", stop], _reply=reply, **kw))
    assert "".join(pieces) == reply.text == full.text[:cut] and reply.finish == "stop"
    assert not any(stop[:2] in p for p in pieces)
    tail = full.text[-1] + "\x00 never said"  # its start ends the answer: held back, then given when it never comes
    reply = Reply("")
    pieces = list(model.chat().stream(stop=[tail], _reply=reply, **kw))
    assert "".join(pieces) == full.text and reply.finish == "length"
    model.close()


def test_a_chat_that_keeps_its_history_refuses_a_turn_that_overflows_it(bundle):
    model = LLaSM.load(bundle, n_ctx=256)
    history = [(f"this is question number {i}, asked at length", f"and this is answer number {i}") for i in range(8)]
    kept = model.chat(history=history, drop_oldest=False)
    with pytest.raises(ContextFull, match="the context holds 256"):
        kept.send(text="one more", max_tokens=24)
    assert len(kept.exchanges) == 8 and kept.dropped == 0
    dropping = model.chat(history=history)
    assert dropping.send(text="one more", max_tokens=24).tokens > 0 and dropping.dropped > 0
    model.close()
