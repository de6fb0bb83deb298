"""Whisper's encoder and decoder from a CTranslate2 `model.bin` (a faster-whisper conversion), without ctranslate2.

The file format, as ctranslate2's `specs/model_spec.py` writes it (little-endian):
    u32 binary version (6), string spec name ("WhisperSpec"), u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes,
    u32 alias count, then (alias, target) string pairs.
A string is a u16 length that counts a trailing NUL, the bytes, then the NUL.
Quantized weights come with a `<name>_scale` companion: int8 rows were multiplied by a per-row scale
(127 / max |row|), int16 tensors by one scalar; dividing by the scale gives the float weight back.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .whisper_config import WhisperDecoderConfig, WhisperEncoderConfig

if TYPE_CHECKING:
    from .whisper import WhisperEncoder

log = logging.getLogger(__name__)

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
WHISPER_HEAD_DIM = 64  # every released Whisper size; used only when the file stores no num_heads
START_OF_TRANSCRIPT = "<|startoftranscript|>"  # the decoder-start token

# dtype id -> numpy dtype, in the order of ctranslate2's DataType enum. bf16 (5) is widened to float32 on read.
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
           5: np.dtype("<u2")}
_DTYPE_NAMES = "0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16"


class _Reader:
    """Sequential reads from a buffer, with an error that names the file when it runs short."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise ValueError(f"{self.path} is truncated or not a CTranslate2 model: needed {n} bytes at offset "
                             f"{start}, the file has {len(self.buf)} bytes")
        self.pos += n
        return start

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))

    def u8(self) -> int:
        return self.unpack("<B")[0]

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def string(self) -> str:
        n = self.unpack("<H")[0]
        if n == 0:
            raise ValueError(f"{self.path}: a string of length 0 at offset {self.pos - 2} (expected a count "
                             "that includes the trailing NUL): not a CTranslate2 model")
        raw = bytes(self.buf[self.take(n):self.pos])
        if raw[-1] != 0:
            raise ValueError(f"{self.path}: a string without its trailing NUL at offset {self.pos - n}: "
                             "not a CTranslate2 model")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: a string that is not UTF-8 at offset {self.pos - n}: "
                             "not a CTranslate2 model") from e


def read_ct2(path, spec: str | None = None) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 `model.bin`, aliases resolved, as arrays over a memory map.

    Arrays keep the file's dtype (float16 stays float16, quantized weights stay int8/int16 next to their
    `_scale`), except bfloat16, which numpy lacks, widened to float32. Scalars are 0-d arrays.
    spec: when given, the spec name the file must declare (e.g. "WhisperSpec").
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError(f"{path} is empty: expected a CTranslate2 model.bin")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays mapped while any array uses it
    r = _Reader(buf, path)
    version = r.u32()
    if version != BINARY_VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, expected {BINARY_VERSION} "
                         "(or this is not a CTranslate2 model.bin)")
    name = r.string()
    if spec is not None and name != spec:
        raise ValueError(f"{path} holds a CTranslate2 {name!r}, expected {spec!r}")
    revision = r.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32()):
        var = r.string()
        dims = r.unpack(f"<{r.u8()}I")
        dtype_id = r.u8()
        if dtype_id not in _DTYPES:
            raise ValueError(f"{path}: variable {var!r} has dtype id {dtype_id}, expected one of {_DTYPE_NAMES}")
        dtype = _DTYPES[dtype_id]
        n_bytes = r.u32()
        count = int(np.prod(dims, dtype=np.int64))
        if n_bytes != count * dtype.itemsize:
            raise ValueError(f"{path}: variable {var!r} of shape {list(dims)} and dtype id {dtype_id} has "
                             f"{n_bytes} bytes, expected {count * dtype.itemsize}")
        array = np.frombuffer(buf, dtype=dtype, count=count, offset=r.take(n_bytes)).reshape(dims)
        if dtype_id == 5:  # bfloat16: the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[var] = array
    for _ in range(r.u32()):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise ValueError(f"{path}: alias {alias!r} points to {target!r}, which the file does not hold")
        variables[alias] = variables[target]
    if r.pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - r.pos} unexpected bytes after the aliases (read {r.pos} of "
                         f"{len(buf)}): not a CTranslate2 model.bin of binary version {BINARY_VERSION}")
    log.debug("read %s: %s revision %d, %d variables", path, name, revision, len(variables))
    return variables


def float_variable(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A variable as float32, dequantized with its `<name>_scale` when the file stores one."""
    if name not in variables:
        raise ValueError(f"the CTranslate2 model has no variable {name!r}")
    value = variables[name]
    scale = variables.get(name + "_scale")
    if scale is None:
        if value.dtype.kind != "f":
            raise ValueError(f"variable {name!r} is {value.dtype} without a {name}_scale companion: "
                             "expected a float tensor or a quantized one with its scale")
        return value.astype(np.float32)
    scale = scale.astype(np.float32)
    if value.dtype not in (np.int8, np.int16):
        raise ValueError(f"variable {name!r} has a {name}_scale but dtype {value.dtype}, expected int8 or int16")
    if scale.size not in (1, value.shape[0]):
        raise ValueError(f"{name}_scale has {scale.size} values, expected 1 or {value.shape[0]} (one per row)")
    # int8: one scale per output row (conv weights included); int16: one scalar.
    return value.astype(np.float32) / scale.reshape((-1,) + (1,) * (value.ndim - 1))


def _model_bin(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ValueError(f"no CTranslate2 model at {path}: expected a model.bin file or a directory holding one")
    return path


def encoder_config_from_ct2(variables: dict[str, np.ndarray]) -> WhisperEncoderConfig:
    """The encoder's geometry, read from tensor shapes (and encoder/num_heads when stored)."""
    for need in ("encoder/conv1/weight", "encoder/position_encodings/encodings",
                 "encoder/layer_0/ffn/linear_0/weight"):
        if need not in variables:
            raise ValueError(f"the CTranslate2 model has no {need!r}: expected a Whisper encoder")
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape  # (d_model, n_mels, 3)
    n_layers, n_heads = _layer_numbers(variables, "encoder"), _n_heads(variables, "encoder", d_model)
    return WhisperEncoderConfig(n_mels=n_mels, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                                max_positions=variables["encoder/position_encodings/encodings"].shape[0])


def _split_fused(state: dict, get, src: str, dst: str, projs: tuple, d: int) -> None:
    """A CTranslate2 linear fused along the output dim (q|k|v or k|v) -> one (weight, bias) per projection."""
    w, b = get(f"{src}/weight"), get(f"{src}/bias")  # (n*d, d), (n*d,)
    n = len(projs)
    if w.shape != (n * d, d) or b.shape != (n * d,):
        raise ValueError(f"{src} has weight {list(w.shape)} and bias {list(b.shape)}, expected [{n * d}, {d}] and "
                         f"[{n * d}] (fused {'|'.join(p[0] for p in projs)})")
    # Whisper's k projections have no bias (ctranslate2 stores zeros). Even a non-zero one would add the same
    # q.b to every key's score, which softmax ignores, so dropping it is exact.
    for j, proj in enumerate(projs):
        state[f"{dst}.{proj}.weight"] = w[j * d:(j + 1) * d]
        if proj != "k_proj":
            state[f"{dst}.{proj}.bias"] = b[j * d:(j + 1) * d]


def _layer_numbers(variables: dict, part: str) -> int:
    layers = {int(m.group(1)) for k in variables if (m := re.match(rf"{part}/layer_(\d+)/", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"{part} layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    return len(layers)


def _n_heads(variables: dict, part: str, d_model: int) -> int:
    if f"{part}/num_heads" in variables:
        return int(variables[f"{part}/num_heads"].item())
    if d_model % WHISPER_HEAD_DIM == 0:
        return d_model // WHISPER_HEAD_DIM
    raise ValueError(f"the model stores no {part}/num_heads and d_model {d_model} is not a multiple of "
                     f"Whisper's head size {WHISPER_HEAD_DIM}")


def encoder_state_from_ct2(variables: dict[str, np.ndarray], cfg: WhisperEncoderConfig) -> dict[str, np.ndarray]:
    """Our WhisperEncoder's state dict (float32 numpy) from CTranslate2 variable names."""
    get = lambda name: float_variable(variables, name)  # noqa: E731
    d = cfg.d_model
    state = {"embed_positions.weight": get("encoder/position_encodings/encodings"),
             "layer_norm.weight": get("encoder/layer_norm/gamma"),
             "layer_norm.bias": get("encoder/layer_norm/beta")}
    for conv in ("conv1", "conv2"):
        for p in ("weight", "bias"):
            state[f"{conv}.{p}"] = get(f"encoder/{conv}/{p}")
    for i in range(cfg.n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        _split_fused(state, get, f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"),
                     d)
        pairs = {"self_attn.out_proj": "self_attention/linear_1", "fc1": "ffn/linear_0", "fc2": "ffn/linear_1"}
        for ours, theirs in pairs.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/weight")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/bias")
        for ours, theirs in {"self_attn_layer_norm": "self_attention/layer_norm",
                             "final_layer_norm": "ffn/layer_norm"}.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/gamma")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/beta")
    return state


def _load_state(module, state: dict[str, np.ndarray], path: Path, cfg) -> None:
    """Float32 numpy state into module, with an error naming the file when a shape does not fit."""
    import torch

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert state.keys() == expected.keys(), sorted(state.keys() ^ expected.keys())
    for name, value in state.items():
        if value.shape != expected[name]:
            raise ValueError(f"{path}: {name} has shape {list(value.shape)}, expected {list(expected[name])} "
                             f"for {cfg}")
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def load_ct2_whisper_encoder(model_dir_or_bin) -> WhisperEncoder:
    """A frozen float32 Whisper encoder from a CTranslate2 Whisper directory or its model.bin."""
    path = _model_bin(model_dir_or_bin)
    variables = read_ct2(path, spec=WHISPER_SPEC)
    cfg = encoder_config_from_ct2(variables)
    from .whisper import WhisperEncoder

    encoder = WhisperEncoder(cfg)
    _load_state(encoder, encoder_state_from_ct2(variables, cfg), path, cfg)
    log.info("loaded Whisper encoder from %s: %d layers, d_model %d, %d heads, %d mels", path, cfg.n_layers,
             cfg.d_model, cfg.n_heads, cfg.n_mels)
    return encoder.eval().requires_grad_(False)


def decoder_config_from_ct2(variables: dict[str, np.ndarray], n_positions: int) -> WhisperDecoderConfig:
    """The decoder's geometry from tensor shapes (and decoder/num_heads when stored), first n_positions kept."""
    for need in ("decoder/embeddings/weight", "decoder/position_encodings/encodings",
                 "decoder/layer_0/ffn/linear_0/weight"):
        if need not in variables:
            raise ValueError(f"the CTranslate2 model has no {need!r}: expected a Whisper decoder")
    table_rows, d_model = variables["decoder/position_encodings/encodings"].shape
    if n_positions > table_rows:
        raise ValueError(f"{n_positions} queries, the Whisper decoder has {table_rows} positions")
    return WhisperDecoderConfig(d_model=d_model, n_layers=_layer_numbers(variables, "decoder"),
                                n_heads=_n_heads(variables, "decoder", d_model),
                                ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                                n_positions=n_positions)


def decoder_state_from_ct2(variables: dict[str, np.ndarray], cfg: WhisperDecoderConfig) -> dict[str, np.ndarray]:
    """Our WhisperDecoder's state dict (float32 numpy) from CTranslate2 variable names (token table left out)."""
    get = lambda name: float_variable(variables, name)  # noqa: E731
    d = cfg.d_model
    state = {"embed_positions.weight": get("decoder/position_encodings/encodings")[:cfg.n_positions],
             "layer_norm.weight": get("decoder/layer_norm/gamma"),
             "layer_norm.bias": get("decoder/layer_norm/beta")}
    for i in range(cfg.n_layers):
        src, dst = f"decoder/layer_{i}", f"layers.{i}"
        _split_fused(state, get, f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"),
                     d)
        _split_fused(state, get, f"{src}/attention/linear_0", f"{dst}.encoder_attn", ("q_proj",), d)
        _split_fused(state, get, f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"), d)
        pairs = {"self_attn.out_proj": "self_attention/linear_1", "encoder_attn.out_proj": "attention/linear_2",
                 "fc1": "ffn/linear_0", "fc2": "ffn/linear_1"}
        for ours, theirs in pairs.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/weight")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/bias")
        for ours, theirs in {"self_attn_layer_norm": "self_attention/layer_norm",
                             "encoder_attn_layer_norm": "attention/layer_norm",
                             "final_layer_norm": "ffn/layer_norm"}.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/gamma")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/beta")
    return state


def start_token_id(model_dir) -> int:
    """The id of <|startoftranscript|> from a CTranslate2 Whisper directory's vocabulary.txt (one token per
    line, line i is id i) or tokenizer.json."""
    model_dir = Path(model_dir)
    vocabulary = model_dir / "vocabulary.txt"
    if vocabulary.is_file():
        with open(vocabulary, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.rstrip("\n") == START_OF_TRANSCRIPT:
                    return i
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        data = json.loads(tokenizer.read_text(encoding="utf-8"))
        for token in data.get("added_tokens", []):
            if token.get("content") == START_OF_TRANSCRIPT:
                return int(token["id"])
        vocab = data.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict) and START_OF_TRANSCRIPT in vocab:
            return int(vocab[START_OF_TRANSCRIPT])
    raise ValueError(f"no {START_OF_TRANSCRIPT} token id in {model_dir}: expected it in vocabulary.txt or "
                     "tokenizer.json beside model.bin")


def load_ct2_whisper_decoder(model_dir_or_bin, n_queries: int):
    """A frozen float32 Whisper decoder from a CTranslate2 Whisper directory or its model.bin, and its n_queries
    query rows (Q, C): the <|startoftranscript|> embedding (id from the directory's vocabulary), once per position.

    Only that one row of the token table is read: the adaptor never holds the whole vocabulary.
    """
    import torch

    path = _model_bin(model_dir_or_bin)
    variables = read_ct2(path, spec=WHISPER_SPEC)
    cfg = decoder_config_from_ct2(variables, n_queries)
    from .whisper import WhisperDecoder

    decoder = WhisperDecoder(cfg)
    _load_state(decoder, decoder_state_from_ct2(variables, cfg), path, cfg)
    sot = start_token_id(path.parent)
    table = variables["decoder/embeddings/weight"]
    if not 0 <= sot < table.shape[0]:
        raise ValueError(f"{path}: {START_OF_TRANSCRIPT} id {sot} is not a row of the {table.shape[0]}-token table")
    row = table[sot].astype(np.float32)  # one row: the whole table is never widened
    scale = variables.get("decoder/embeddings/weight_scale")
    if scale is not None:  # quantized table: one scale per row, or one for all
        scale = scale.astype(np.float32).reshape(-1)
        row = row / scale[sot if scale.size > 1 else 0]
    elif table.dtype.kind != "f":
        raise ValueError(f"decoder/embeddings/weight is {table.dtype} without a scale: expected a float table")
    if "decoder/scale_embeddings" in variables and bool(variables["decoder/scale_embeddings"].item()):
        row = row * math.sqrt(cfg.d_model)  # ctranslate2 scales token embeddings (never positions) when set
    queries = torch.from_numpy(np.ascontiguousarray(row)).expand(n_queries, -1).contiguous()  # (Q, C)
    log.info("loaded Whisper decoder from %s: %d layers, d_model %d, %d heads, %d queries (start token %d)", path,
             cfg.n_layers, cfg.d_model, cfg.n_heads, n_queries, sot)
    return decoder.eval().requires_grad_(False), queries
