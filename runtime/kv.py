"""What the llama.cpp KV cache holds, kept in one place: the ledger that every conversation goes through.

llama.cpp keeps keys and values per position but cannot say what a position holds: audio goes in as embedding rows,
which have no token ids. The ledger records a content key for every position it feeds (the token id of text, a
digest of the bytes of an embedding row), so that a feed asked for later is compared with what the cache holds and
only the part that differs is computed, rows included. llama.cpp's server does the same for a slot (its cache tokens
and one function that reuses the common prefix); whisper's decoding.py keeps its KV cache behind one object too.

A feed is a list of items in order: token lists and (n, n_embd) row arrays.

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

log = logging.getLogger(__name__)


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
        held, n = self._keys, 0
        for item in feed:
            part = held[n:n + len(item)]
            if not part:
                break
            same = next((i for i, (a, b) in enumerate(zip(keys(item[:len(part)]), part)) if a != b), len(part))
            n += same
            if same < len(item):
                break
        return n

    def holds(self, feed: list) -> bool:
        """The cache holds exactly `feed`."""
        return self.size == size(feed) == self.common(feed)

    def load(self, feed: list) -> int:
        """Make the cache hold exactly `feed`, keeping the longest prefix of it the cache holds already; -> positions
        computed. The logits are then the feed's last position's: where the whole feed is held already but the
        logits are another decode's, the last position is computed again."""
        n = size(feed)
        keep = self.common(feed)
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

    def truncate(self, n: int) -> None:
        """Forget positions n and later."""
        self._check()
        self.llm.truncate(n)
        self.llm.mark()
        del self._keys[n:]

    def _check(self) -> None:
        """Forget what the LLM was made to forget, or fed, behind the ledger's back."""
        ok = min(len(self._keys), self.llm.untouched)
        if ok < len(self._keys) or self.llm.n_past != ok:
            log.debug("the LLM was changed outside its ledger: %d of %d positions kept", ok, len(self._keys))
            self.llm.truncate(ok)
            self.llm.mark()
            del self._keys[ok:]
