"""The whisper-decoder adaptor's rows: what Whisper heard, in the LLM's input-embedding space.

    samples -> Transcriber (whisper_decode.py): Whisper's tokens, their candidates and decoder states
            -> the transcript's own LLM tokens (llama.cpp's tokenizer, the text taken literally)
            -> one row per LLM token: the LLM's input embedding of that token (TokenRows, from the GGUF), so the
               LLM reads the words as if they had been typed, and never sees Whisper's ids or text as such

rows = "hard": those embeddings exactly (the cascade, in embedding form). rows = "soft": where one LLM token spans
exactly one Whisper token, its row mixes the embeddings of Whisper's candidates for that token by their
probabilities (each candidate that is one LLM token on its own; LegoSLM's interface), so that Whisper's doubt
reaches the LLM. A learned map (W, b) adds W h + b to such a row, h the decoder state that chose the token.
begin/end: text the rows sit between (as rows), "" for none.
"""
from __future__ import annotations

import logging

import numpy as np

from .audio import NoSpeech
from .whisper_decode import Heard, Transcriber, WhisperVocab

log = logging.getLogger(__name__)

ROW_KINDS = ("soft", "hard")


class RowMap:
    """Heard -> (n, n_embd) rows for one LLM (see the module docstring)."""

    def __init__(self, llm, vocab: WhisperVocab, rows: str = "soft", begin: str = "", end: str = "",
                 weight: np.ndarray | None = None, bias: np.ndarray | None = None):
        if rows not in ROW_KINDS:
            raise ValueError(f"rows must be one of {ROW_KINDS}, got {rows!r}")
        if llm.token_rows is None:
            raise ValueError(f"the whisper-decoder adaptor needs the LLM's token embeddings, which could not be read "
                             f"from its GGUF in a form that reproduces llama.cpp's ({llm.n_embd} columns)")
        if weight is not None and (weight.shape[0] != llm.n_embd or bias is None or bias.shape != (llm.n_embd,)):
            raise ValueError(f"the row map has weight {list(weight.shape)} and bias "
                             f"{None if bias is None else list(bias.shape)}, the LLM takes rows of {llm.n_embd}")
        self.llm, self.vocab, self.rows = llm, vocab, rows
        self.table = llm.token_rows
        self.begin = self.table.rows(llm.tokenize(begin, special=False)) if begin else None
        self.end = self.table.rows(llm.tokenize(end, special=False)) if end else None
        self.weight, self.bias = weight, bias
        self._single: dict[int, int] = {}  # Whisper id -> the one LLM token its piece is, or -1

    @property
    def n_embd(self) -> int:
        return self.llm.n_embd

    def single(self, whisper_id: int) -> int:
        """The LLM token that Whisper token's bytes are, tokenized alone; -1 when they are several (or none)."""
        got = self._single.get(whisper_id)
        if got is None:
            piece = self.vocab.pieces[whisper_id] if 0 <= whisper_id < len(self.vocab.pieces) else b""
            ids = self.llm.tokenize(piece, special=False) if piece else []
            got = self._single[whisper_id] = ids[0] if len(ids) == 1 and self.llm.piece(ids[0]) == piece else -1
        return got

    def _spans(self, heard: Heard, start: int, stop: int, first: bool) -> tuple[bytes, list[int], dict]:
        """(the bytes of tokens start..stop, trimmed where they begin (first) and end the transcript; their LLM
        tokens; {(start, end) byte span: Whisper token index})."""
        pieces = [self.vocab.pieces[t] for t in heard.tokens[start:stop]]
        full = b"".join(pieces)
        lead = len(full) - len(full.lstrip()) if first else 0
        text = full[lead:].rstrip() if stop >= len(heard.tokens) else full[lead:]
        spans, at = {}, -lead
        for i, p in enumerate(pieces, start):
            spans[(max(at, 0), at + len(p))] = i  # the first word's leading blank is trimmed
            at += len(p)
        return text, self.llm.tokenize(text, special=False) if text else [], spans

    def __call__(self, heard: Heard) -> np.ndarray:
        return self.rows_of(heard)

    def rows_of(self, heard: Heard, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of Whisper tokens start..stop of `heard`: a transcript in parts (a listener's agreed words, then the
        rest) gives the rows of the whole, where each part starts a word (the LLM's tokenizer splits before a
        blank, and after sentence punctuation). The begin rows come with the first part, the end rows with the
        last."""
        stop = len(heard.tokens) if stop is None else stop
        first, last = start == 0, stop >= len(heard.tokens)
        text, ids, spans = self._spans(heard, start, stop, first)
        rows = self.table.rows(ids) if ids else np.zeros((0, self.n_embd), np.float32)
        if ids and (self.rows == "soft" or self.weight is not None):
            pieces = [self.llm.piece(t) for t in ids]
            if sum(map(len, pieces)) != len(text):  # llama.cpp's pieces do not spell the text: no alignment
                log.debug("LLM pieces do not spell the transcript %r: hard rows", text)
                pieces = []
            at = 0
            for j, piece in enumerate(pieces):
                i = spans.get((at, at + len(piece)))
                at += len(piece)
                if i is None or i < heard.forced:  # a forced token has no candidates of its own
                    continue
                if self.rows == "soft":
                    rows[j] = self._mix(heard, i, ids[j], rows[j])
                if self.weight is not None:
                    rows[j] += self.weight @ heard.hidden[i] + self.bias
        parts = [r for r in (self.begin if first else None, rows, self.end if last else None) if r is not None]
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def _mix(self, heard: Heard, i: int, token: int, row: np.ndarray) -> np.ndarray:
        """The posterior mix of Whisper token i's candidates; the exact row where its own choice is not `token`."""
        cands = [(self.single(int(c)), float(p)) for c, p in zip(heard.top_ids[i], heard.top_p[i])]
        if cands[0][0] != token:
            return row
        ids = [c for c, p in cands if c >= 0 and p > 0]
        p = np.asarray([p for c, p in cands if c >= 0 and p > 0], np.float32)
        if len(ids) < 2:
            return row
        return (p / p.sum()) @ self.table.rows(ids)


class HeardEncoder:
    """The whisper-decoder adaptor behind the audio-encoder interface: samples -> features -> rows, and what was
    heard (encode_heard)."""

    def __init__(self, transcriber: Transcriber, rowmap: RowMap, lang: str | None = None):
        self.transcriber, self.rowmap, self.lang = transcriber, rowmap, lang
        self.geometry = transcriber.geometry
        self.n_embd = rowmap.n_embd

    def features(self, samples: np.ndarray) -> list:
        return self.transcriber.features(samples)

    def encode_heard(self, passes: list) -> tuple[np.ndarray, Heard]:
        """Rows and what was heard; NoSpeech when Whisper heard no words at all."""
        heard = self.transcriber.transcribe(passes, self.lang)
        if not heard.tokens:
            raise NoSpeech("heard no speech in the audio")
        return self.rowmap(heard), heard

    def encode(self, passes: list) -> np.ndarray:
        return self.encode_heard(passes)[0]

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return self.encode(self.features(samples))


def heard_encoder(bundle, llm, n_threads: int | None = None) -> HeardEncoder:
    """A whisper-decoder bundle's adaptor, for its loaded LLM (the rows are that LLM's own embeddings)."""
    from . import bundle as B
    from .bundle import BundleError
    from .whisper_decode import WhisperVocabError

    cfg = bundle.adaptor
    try:
        vocab = WhisperVocab.from_file(bundle.file(B.WHISPER_TOKENS))
        transcriber = Transcriber(bundle.audio_encoder, bundle.file(B.TEXT_DECODER), vocab, bundle.geometry,
                                  languages=tuple(cfg.get("languages", ("en", "zh"))),
                                  pad_seconds=float(cfg.get("pad_seconds", 0.0)), n_threads=n_threads,
                                  tuned=tuple(cfg.get("tuned", ())))
        weight = bias = None
        if bundle.optional(B.ROW_MAP) is not None:
            with np.load(bundle.file(B.ROW_MAP)) as npz:
                weight, bias = npz["weight"].astype(np.float32), npz["bias"].astype(np.float32)
        rowmap = RowMap(llm, vocab, rows=cfg.get("rows", "soft"), begin=cfg.get("begin", ""), end=cfg.get("end", ""),
                        weight=weight, bias=bias)
    except (WhisperVocabError, ValueError, KeyError, OSError) as e:
        raise BundleError(f"the bundle's whisper-decoder adaptor cannot be loaded: {e}") from None
    return HeardEncoder(transcriber, rowmap)
