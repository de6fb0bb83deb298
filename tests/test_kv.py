"""The KV ledger: what the cache holds, the longest common prefix kept (rows compared by content), the logits of its
end, and a cache left as it was when a feed fails."""
import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from llasm.runtime.bundle import read_bundle  # noqa: E402
from llasm.runtime.kv import KVLedger, keys, size, skip  # noqa: E402
from llasm.runtime.llm import LLM, ContextFull, LLMError  # noqa: E402


@pytest.fixture(scope="module")
def path(bundle):
    return read_bundle(bundle).llm


@pytest.fixture(scope="module")
def llm(path):
    m = LLM(path, n_ctx=64, n_batch=8)  # n_batch 8: feeds span several decodes; no warm_up: no token rows
    yield m
    m.close()


def rows(llm, n, seed):
    return (0.05 * np.random.default_rng(seed).standard_normal((n, llm.n_embd))).astype(np.float32)


def at_once(path, feed) -> np.ndarray:
    """The logits after `feed`, computed from an empty cache in another context."""
    fresh = LLM(path, n_ctx=64)
    try:
        fresh.eval(feed)
        return fresh.logits()
    finally:
        fresh.close()


def test_feeds_are_measured_and_cut_by_position():
    r = np.zeros((3, 4), np.float32)
    assert size([[1, 2], r, []]) == 5
    cut = skip([[1, 2], r, [3]], 3)
    assert len(cut) == 2 and cut[0].shape == (2, 4) and cut[1] == [3]
    assert keys([5, 6]) == [5, 6] and keys(r)[0] == keys(r.astype(np.float64))[0] != keys(r + 1)[0]


def test_load_keeps_the_longest_common_prefix_rows_included(llm, path):
    kv = KVLedger(llm)
    a = llm.tokenize("hello world")
    r = rows(llm, 11, seed=0)
    first = [a, r, llm.tokenize("one two")]
    assert kv.load(first) == size(first) and kv.holds(first) and kv.has_logits
    assert kv.load(first) == 0  # held, and the logits are its end's: nothing to compute
    other = [a, r.copy(), llm.tokenize("three")]  # equal rows in another array, other text after them
    assert kv.common(other) == len(a) + 11
    assert kv.load(other) == size(other) - len(a) - 11 and kv.holds(other)
    np.testing.assert_allclose(llm.logits(), at_once(path, other), atol=1e-4)
    changed = r.copy()
    changed[7, 3] += 1e-3  # one row differs by one value: it and all after it are computed again
    assert kv.load([a, changed]) == 11 - 7
    np.testing.assert_allclose(llm.logits(), at_once(path, [a, changed]), atol=1e-4)
    assert kv.load([a, changed[:5]]) == 1  # a prefix of what is held: its last position computed for its logits
    np.testing.assert_allclose(llm.logits(), at_once(path, [a, changed[:5]]), atol=1e-4)
    assert kv.load([]) == 0 and kv.size == llm.n_past == 0


def test_the_ledger_knows_whether_the_logits_are_those_of_its_end(llm):
    kv = KVLedger(llm, header=[llm.tokenize("one two three")])
    n = kv.size
    assert n > 2 and kv.has_logits
    kv.truncate(n)  # nothing removed
    assert kv.has_logits
    kv.truncate(n - 1)
    assert not kv.has_logits  # the logits are those of the position just removed
    kv.extend([rows(llm, 2, seed=1)])
    assert kv.has_logits and kv.size == n + 1
    assert kv.load(kv.header) == 1  # held whole, but the logits were the rows'
    assert kv.has_logits


def test_a_feed_that_fails_leaves_the_cache_as_it_was(llm):
    kv = KVLedger(llm, header=[llm.tokenize("hello")])
    held, room = kv.header, llm.n_ctx - kv.size
    with pytest.raises(ContextFull):  # the first array is decoded (no token rows: one decode per item), not the next
        kv.extend([rows(llm, room - 10, seed=2), rows(llm, 20, seed=3)])
    assert kv.holds(held) and llm.n_past == kv.size
    with pytest.raises(ContextFull):
        kv.load(held + [rows(llm, room + 1, seed=4)])
    assert kv.size == llm.n_past and kv.common(held) == kv.size  # at most the common prefix is left


def test_a_cache_changed_behind_the_ledgers_back_keeps_what_stayed_untouched(llm):
    one, two = llm.tokenize("hello world"), llm.tokenize("one two")
    kv = KVLedger(llm, header=[one, two])
    n = kv.size
    llm.eval_tokens(llm.tokenize("three"))  # fed at the end, then truncated back: still the ledger's
    llm.truncate(n)
    assert kv.holds([one, two]) and not kv.has_logits
    llm.eval_tokens(llm.tokenize("four"))  # fed at the end and left there: dropped
    assert kv.holds([one, two]) and llm.n_past == n
    llm.truncate(len(one) - 1)
    llm.eval_tokens(llm.tokenize("hello"))  # as long as the header maybe, but not what the ledger fed
    assert kv.size == len(one) - 1 == llm.n_past
    assert kv.load([one, two]) == len(two) + 1


def test_a_parked_history_comes_back_whole_and_outlasts_shorter_ones(llm, path):
    kv = KVLedger(llm)
    chat = [llm.tokenize("hello world"), rows(llm, 30, seed=5)]
    other = [llm.tokenize("one two three")]  # shares nothing with chat (another system prompt)
    t1, t2 = other + [rows(llm, 20, seed=6)], other + [rows(llm, 20, seed=7)]
    assert kv.load(chat) == size(chat)
    assert kv.load(t1) == size(t1)  # the chat is parked (copied out), not kept in the cache
    assert kv.load(t2) == 20  # t1's rows are thrown away: parking them would lose the chat, which holds more
    more = chat + [llm.tokenize("and then")]
    assert kv.load(more) == len(more[-1])  # the chat comes back whole (t2 parked in its place)
    np.testing.assert_allclose(llm.logits(), at_once(path, more), atol=1e-4)
    assert kv.load(t2) == 1  # and t2 comes back: only its last position is computed again, for its logits
    np.testing.assert_allclose(llm.logits(), at_once(path, t2), atol=1e-4)
    kv.truncate(0)


def positions(feed):
    for item in feed:
        if isinstance(item, np.ndarray):
            yield from (row.tobytes() for row in item)
        else:
            yield from item


def shared(f, g) -> int:
    """Positions two feeds share from the start: equal token ids, bit-equal rows."""
    n = 0
    for p, q in zip(positions(f), positions(g)):
        if type(p) is not type(q) or p != q:
            break
        n += 1
    return n


def test_two_conversations_in_turn_keep_what_they_share_through_a_listener_turn_and_a_transcription(bundle, path):
    """A and B begin alike (the same audio, other words); A's next turn is listened to; a transcription runs; then
    each goes on. Each turn computes only what the KV cache did not hold (A's history comes back whole after the
    transcription: the ledger parked it), and its first token's logits are those of its history and turn computed at
    once in a fresh context."""
    from test_listen import heard, sampled

    from llasm.runtime.chat import LLaSM, Reply

    model = LLaSM.load(bundle)
    kv = model.kv
    fresh = LLM(path, n_ctx=model.llm.n_ctx)
    a, b = model.chat(), model.chat()
    x, y, z = tiny.speech(1.5, seed=20), tiny.speech(1.5, seed=21), tiny.speech(1.0, seed=22)

    def as_at_once(chat, seen):
        prompt = chat.history()[:-1]  # history and turn, without the answer
        fresh.truncate(0)
        for item in prompt:
            (fresh.eval_embeddings if isinstance(item, np.ndarray) else fresh.eval_tokens)(item)
        np.testing.assert_allclose(seen[0], fresh.logits(), atol=1e-4)
        return prompt

    with sampled() as seen:
        r = a.send(audio=x, text="hi", max_tokens=4)
    assert r.prefilled == size(as_at_once(a, seen)) - size(kv.header)  # the header was there

    with sampled() as seen:
        r = b.send(audio=x, text="hey", max_tokens=4)
    prompt = as_at_once(b, seen)
    common = shared(prompt, a.history())
    assert common >= len(prompt[0]) + len(prompt[1])  # header, markup and the audio's rows: A computed them
    assert r.prefilled == size(prompt) - common

    before, computed = a.history(), kv.computed
    lis = a.listen(trim=False, step_rows=3, context_rows=4, lookahead_rows=2)
    heard(lis, y, block=1600)
    assert lis.rows_ahead > 0
    with sampled() as seen:
        for _ in lis.answer(max_tokens=4, _reply=Reply("")):
            pass
    as_at_once(a, seen)
    assert kv.computed - computed == size(a.history()) - size(before)  # the turn and its answer: no history again

    with sampled() as seen:
        model.transcribe(z, max_tokens=4)
    other = LLaSM.load(bundle)
    with sampled() as want:
        other.transcribe(z, max_tokens=4)
    other.close()
    np.testing.assert_allclose(seen[0], want[0], atol=1e-4)

    before = a.history()
    with sampled() as seen:
        r = a.send(text="and then?", max_tokens=4)
    prompt = as_at_once(a, seen)
    assert r.prefilled == size(prompt) - size(before) > 0  # the transcription left A's history whole

    with sampled() as seen:
        r = b.send(text="and you?", max_tokens=4)
    prompt = as_at_once(b, seen)
    common = shared(prompt, a.history())
    assert common >= len(prompt[0]) + len(prompt[1]) and r.prefilled == size(prompt) - common
    fresh.close()
    model.close()


def test_several_prompts_decoded_together_give_what_each_gives_alone(llm, path):
    prompts = [[int(t) for t in np.random.default_rng(seed).integers(5, 300, size=n)]
               for seed, n in ((1, 3), (2, 11), (3, 6))]  # 11 > n_batch 8: a prompt over two decodes
    alone = [llm.complete(p, 7) for p in prompts]
    many = LLM(path, n_ctx=96, n_batch=8, n_seq=3)
    try:
        before = many.decodes
        assert many.complete_many(prompts, 7) == alone and any(alone)
        assert many.decodes - before <= 1 + 2 + 1 + 7  # the prompts, then one decode a step for all three
        assert many.n_past == 0 and many.complete(prompts[1], 7) == alone[1]  # the cache is left empty
        for bad in ([prompts[0]] * 4, [prompts[0], []]):
            with pytest.raises(LLMError, match="takes 1 to 3 prompts"):
                many.complete_many(bad, 7)
        with pytest.raises(ContextFull):
            many.complete_many(prompts, many.n_ctx // 3)  # with the 20 prompt positions: more than n_ctx
    finally:
        many.close()
