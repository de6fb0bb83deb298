"""What the llama.cpp KV cache holds, kept in one place: the ledger that every conversation goes through.

llama.cpp keeps keys and values per position but cannot say what a position holds: audio goes in as embedding rows,
which have no token ids. The ledger records a content key for every position it feeds (the token id of text, a
digest of the bytes of an embedding row), so that a feed asked for later is compared with what the cache holds and
only the part that differs is computed, rows included. llama.cpp's server does the same for a slot (its cache tokens
and one function that reuses the common prefix); whisper's decoding.py keeps its KV cache behind one object too.

A feed is a list of items in order: token lists and (n, n_embd) row arrays.

Besides what the cache holds, the ledger keeps one earlier state of it, copied out of llama.cpp (parked): a load
that would throw away PARK_MIN positions or more parks them first, unless the parked state would lose more, and a
load that the parked state serves better puts it back (parking the live one in turn). So two conversations used in
turn (a chat and transcriptions between its turns, two chats) each find their history whole: copying the cache out
and back (one more copy of it in memory) costs far less than computing its positions again.

    kv = KVLedger(llm, header=[bos_and_system_tokens])
    kv.load(history + turn)     # the cache holds exactly that now; -> positions computed (the rest was held)
    kv.extend([[token]])        # one more position at the end
    kv.truncate(n)              # forget positions n and later
    kv.has_logits               # llama.cpp's logits are those of the last position held
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from .llm import LLMError

log = logging.getLogger(__name__)

PARK_MIN = 16  # positions a load must throw away to park them: fewer (a listener's changed guess, a conversation
#                repeating the last one) cost little to compute again, and parking copies the whole cache


def size(feed: list) -> int:
    """KV positions a feed takes."""
    return sum(len(item) for item in feed)


def skip(feed: list, n: int) -> list:
    """The feed without its first n positions."""
    rest = []
    for item in feed:
        if n >= len(item):
            n -= len(item)
            continue
        rest.append(item[n:])
        n = 0
    return rest


def keys(item) -> list:
    """Content keys of an item's positions: token ids, or a digest of each row's float32 bytes (equal rows, equal
    keys; a token id and a digest never compare equal)."""
    if not isinstance(item, np.ndarray):
        return [int(t) for t in item]
    rows = np.ascontiguousarray(item, dtype=np.float32)
    return [hashlib.blake2b(row, digest_size=16).digest() for row in rows]


def common_prefix(held: list, feed: list) -> int:
    """How many positions from the start of `feed` the keys `held` cover."""
    n = 0
    for item in feed:
        part = held[n:n + len(item)]
        if not part:
            break
        same = next((i for i, (a, b) in enumerate(zip(keys(item[:len(part)]), part)) if a != b), len(part))
        n += same
        if same < len(item):
            break
    return n


class KVLedger:
    """The record of one LLM's KV cache, and the only code that changes it (through the LLM's decode methods).

    header: the feed new conversations start with (bos + the default system prompt), computed now so that the
    first turn finds it in the cache. Whoever holds the ledger uses the LLM's cache only through it; where the LLM
    was truncated or fed directly all the same, the ledger keeps the positions that stayed untouched.
    """

    def __init__(self, llm, header: list = ()):
        self.llm = llm
        self.header = [list(item) for item in header]
        self._keys: list = []  # one per position held: a token id or a row digest
        self._parked = None  # (keys, state): an earlier state of the cache, copied out of llama.cpp
        self.computed = 0  # positions computed through this ledger, all told
        self.truncate(0)
        if self.header:
            self.load(self.header)

    @property
    def size(self) -> int:
        """Positions the cache holds."""
        self._check()
        return len(self._keys)

    @property
    def has_logits(self) -> bool:
        """llama.cpp's logits are those of the last position held: the last decode ended there."""
        return self.size > 0 and self.llm.has_logits

    def common(self, feed: list) -> int:
        """How many positions from the start of `feed` the cache holds already (tokens compared by id, rows by
        their bytes' digest)."""
        self._check()
        return common_prefix(self._keys, feed)

    def holds(self, feed: list) -> bool:
        """The cache holds exactly `feed`."""
        return self.size == size(feed) == self.common(feed)

    def load(self, feed: list) -> int:
        """Make the cache hold exactly `feed`, keeping the longest prefix of it the cache holds already; -> positions
        computed. The logits are then the feed's last position's: where the whole feed is held already but the
        logits are another decode's, the last position is computed again. The parked state is put back where it
        holds more of the feed; what this load throws away is parked where that is PARK_MIN positions or more, and
        more than the parked state would lose."""
        n = size(feed)
        keep = self.common(feed)
        if self._parked is not None and common_prefix(self._parked[0], feed) > keep:
            self._swap()
            keep = self.common(feed)
        elif self.size - keep >= max(PARK_MIN, self._parked_alone(keep)):
            self._parked = self._copy()
        if keep == n == self.size and (self.has_logits or not n):
            return 0
        keep = max(0, min(keep, n - 1))
        self.truncate(keep)
        self.extend(skip(feed, keep))
        return n - keep

    def extend(self, items: list) -> None:
        """Feed items at the end of the cache (LLMError or ContextFull: the cache is left as it was)."""
        items = [item for item in items if len(item)]
        new = [k for item in items for k in keys(item)]
        start = self.size
        try:
            self.llm.eval(items)
        except BaseException:
            self.llm.truncate(start)
            raise
        finally:
            self.llm.mark()
        self._keys += new
        self.computed += len(new)

    def forget(self) -> None:
        """Forget every conversation: the cache keeps the header only, and nothing is parked (a benchmark's runs
        must not find their audio already computed)."""
        self._parked = None
        self.truncate(min(self.common(self.header), size(self.header)))

    def truncate(self, n: int) -> None:
        """Forget positions n and later."""
        self._check()
        self.llm.truncate(n)
        self.llm.mark()
        del self._keys[n:]

    def _parked_alone(self, keep: int) -> int:
        """Positions of the parked state that the cache will not hold once cut to `keep`."""
        if self._parked is None:
            return 0
        held = self._parked[0]
        same = next((i for i, (a, b) in enumerate(zip(held, self._keys[:keep])) if a != b), min(len(held), keep))
        return len(held) - same

    def _copy(self):
        """(keys, state) of what the cache holds now; None where llama.cpp cannot copy it out."""
        try:
            return list(self._keys), self.llm.save_state()
        except LLMError as e:
            log.info("the KV cache is not parked: %s", e)
            return None

    def _swap(self) -> None:
        """Put the parked state back, parking the live one. Where llama.cpp cannot, the cache is left empty."""
        (held, state), self._parked = self._parked, self._copy()
        try:
            self.llm.load_state(state)
            assert self.llm.n_past == len(held)
            self._keys = held
        except LLMError as e:
            log.info("a parked KV cache is computed again: %s", e)
            self.llm.truncate(0)
            self._keys = []
        self.llm.mark()

    def _check(self) -> None:
        """Forget what the LLM was made to forget, or fed, behind the ledger's back."""
        ok = min(len(self._keys), self.llm.untouched)
        if ok < len(self._keys) or self.llm.n_past != ok:
            log.debug("the LLM was changed outside its ledger: %d of %d positions kept", ok, len(self._keys))
            self.llm.truncate(ok)
            self.llm.mark()
            del self._keys[ok:]
