"""The KV ledger: what the cache holds, the longest common prefix kept (rows compared by content), the logits of its
end, and a cache left as it was when a feed fails."""
import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from llasm.runtime.bundle import read_bundle  # noqa: E402
from llasm.runtime.kv import KVLedger, keys, size, skip  # noqa: E402
from llasm.runtime.llm import LLM, ContextFull  # noqa: E402


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
