"""Decoding loops: greedy decoders (the LLM's answers, Whisper's transcripts) can repeat one block of tokens forever;
both stop at the same test."""
from __future__ import annotations

LOOP_REPEATS = 3  # an answer that ends in the same block of tokens this many times in a row is a decoding loop...
LOOP_MIN_TOKENS = 12  # ...when the repeats span at least this many tokens ("no, no, no" is an answer, not a loop)
LOOP_MAX_BLOCK = 64  # blocks up to this long are looked for: the check per decoded token stays bounded


def loop_excess(tokens: list, repeats: int = LOOP_REPEATS, min_tokens: int = LOOP_MIN_TOKENS) -> int:
    """How many tokens at the end repeat a block: tokens whose last max(repeats * p, min_tokens) tokens are periodic
    with period p <= LOOP_MAX_BLOCK (the shortest such p) give that span less its first block; 0 when there is no
    loop. Runs once per decoded token, over at most repeats * LOOP_MAX_BLOCK tokens."""
    n = len(tokens)
    for p in range(1, min(n // repeats, LOOP_MAX_BLOCK) + 1):
        span = max(repeats * p, min_tokens)
        if span <= n and tokens[n - span: n - p] == tokens[n - span + p:]:
            return span - p
    return 0
