"""The LLM's own input embeddings of token ids, read straight from its GGUF file.

With them, a user turn's text (chat markup, a typed question) and its audio rows go to llama.cpp as one embedding
batch: one llama_decode per turn instead of one per segment. Only the tensor's location is parsed here (gguf-py's
reader builds every one of Qwen's 150k vocabulary strings, seconds per load); its rows are memory-mapped and the
few that a turn needs are dequantized with gguf-py.
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np

TENSOR = "token_embd.weight"
# llama.cpp scales token embeddings by sqrt(n_embd) for these architectures (raw embedding input is not scaled)
SQRT_SCALED = {"gemma", "gemma2", "gemma3"}
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _ARRAY = 8, 9


class TokenRowsError(ValueError):
    pass


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def many(self, fmt: str) -> tuple:
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return out

    def take(self, fmt: str):
        out = self.many(fmt)
        return out[0] if len(out) == 1 else out

    def string(self) -> bytes:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n: self.pos])

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            n = self.take("Q")  # the length, then that many bytes
            self.pos += n
        elif vtype == _ARRAY:
            etype, n = self.take("IQ")
            if etype in _SCALAR_BYTES:
                self.pos += n * _SCALAR_BYTES[etype]
            else:
                for _ in range(n):
                    self.skip_value(etype)
        elif vtype in _SCALAR_BYTES:
            self.pos += _SCALAR_BYTES[vtype]
        else:
            raise TokenRowsError(f"unknown GGUF value type {vtype}")


class TokenRows:
    """rows(ids) -> (len(ids), n_embd) float32, the vectors llama.cpp looks up for those tokens (scaled as it
    scales them), so feeding them as embeddings gives the token path's result."""

    def __init__(self, path):
        try:
            import gguf
        except ImportError as e:
            raise TokenRowsError("gguf is not installed: pip install gguf") from e
        if not hasattr(gguf, "quants") or not hasattr(gguf.quants, "dequantize"):
            raise TokenRowsError(f"gguf {getattr(gguf, '__version__', '?')} cannot dequantize: pip install -U gguf")
        self._gguf = gguf
        path = Path(path)
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                arch, qtype, n_embd, n_vocab, offset = self._locate(buf)
            try:
                self.qtype = gguf.GGMLQuantizationType(qtype)
                block, size = gguf.GGML_QUANT_SIZES[self.qtype]
            except (ValueError, KeyError):
                raise TokenRowsError(f"{TENSOR} has GGML type {qtype}, unknown to gguf-py") from None
            if n_embd % block:
                raise TokenRowsError(f"{TENSOR} rows of {n_embd} do not fill {block}-wide blocks")
            shape = (n_vocab, n_embd // block * size)
            self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
            self.arch, self.n_embd, self.n_vocab = arch, n_embd, n_vocab
            self.scale = np.float32(math.sqrt(n_embd)) if arch in SQRT_SCALED else None
            self.rows([0])  # gguf-py dequantizes this type (it raises NotImplementedError for a few)
        except (OSError, ValueError, NotImplementedError, struct.error) as e:  # TokenRowsError is a ValueError
            raise TokenRowsError(f"cannot read {TENSOR} from {path}: {e}") from None

    @staticmethod
    def _locate(buf) -> tuple:
        """(architecture, ggml type, n_embd, n_vocab, absolute byte offset) of the token embedding tensor."""
        r = _Reader(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise TokenRowsError("not a GGUF file")
        version, n_tensors, n_kv = r.take("4xIQQ")
        if version < 2:
            raise TokenRowsError(f"GGUF version {version} is not supported (2 or later)")
        arch, alignment = "", 32
        for _ in range(n_kv):
            key, vtype = r.string(), r.take("I")
            if key == b"general.architecture" and vtype == _STRING:
                arch = r.string().decode()
            elif key == b"general.alignment" and vtype == 4:
                alignment = r.take("I")
            else:
                r.skip_value(vtype)
        found = None
        for _ in range(n_tensors):
            name, n_dims = r.string(), r.take("I")
            dims = r.many(f"{n_dims}Q")
            qtype, offset = r.take("IQ")
            if name == TENSOR.encode():
                if n_dims != 2:
                    raise TokenRowsError(f"{TENSOR} has {n_dims} dimensions, expected 2")
                found = (qtype, dims[0], dims[1], offset)
        if found is None:
            raise TokenRowsError(f"no {TENSOR} tensor")
        start = -(-r.pos // alignment) * alignment
        qtype, n_embd, n_vocab, offset = found
        return arch, qtype, int(n_embd), int(n_vocab), start + offset

    def rows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise TokenRowsError(f"token ids must lie in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        out = self._gguf.quants.dequantize(np.asarray(self._data[ids]), self.qtype)
        out = np.ascontiguousarray(out, dtype=np.float32).reshape(ids.size, self.n_embd)
        return out * self.scale if self.scale is not None else out
