"""Whisper's encoder from a CTranslate2 `model.bin` (a faster-whisper conversion), without ctranslate2.

The file format, as ctranslate2's `specs/model_spec.py` writes it (little-endian):
    u32 binary version (6), string spec name ("WhisperSpec"), u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes,
    u32 alias count, then (alias, target) string pairs.
A string is a u16 length that counts a trailing NUL, the bytes, then the NUL.
Quantized weights come with a `<name>_scale` companion: int8 rows were multiplied by a per-row scale
(127 / max |row|), int16 tensors by one scalar; dividing by the scale gives the float weight back.
"""
from __future__ import annotations

import logging
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from .whisper import WhisperEncoder, WhisperEncoderConfig

log = logging.getLogger(__name__)

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
WHISPER_HEAD_DIM = 64  # every released Whisper size; used only when the file stores no encoder/num_heads

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
    layers = {int(m.group(1)) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"encoder layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    if "encoder/num_heads" in variables:
        n_heads = int(variables["encoder/num_heads"].item())
    elif d_model % WHISPER_HEAD_DIM == 0:
        n_heads = d_model // WHISPER_HEAD_DIM
    else:
        raise ValueError(f"the model stores no encoder/num_heads and d_model {d_model} is not a multiple of "
                         f"Whisper's head size {WHISPER_HEAD_DIM}")
    return WhisperEncoderConfig(n_mels=n_mels, d_model=d_model, n_layers=len(layers), n_heads=n_heads,
                                ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                                max_positions=variables["encoder/position_encodings/encodings"].shape[0])


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
        qkv_w = get(f"{src}/self_attention/linear_0/weight")  # (3d, d): q | k | v along the output dim
        qkv_b = get(f"{src}/self_attention/linear_0/bias")  # (3d,)
        if qkv_w.shape != (3 * d, d) or qkv_b.shape != (3 * d,):
            raise ValueError(f"{src}/self_attention/linear_0 has weight {list(qkv_w.shape)} and bias "
                             f"{list(qkv_b.shape)}, expected [{3 * d}, {d}] and [{3 * d}] (fused q|k|v)")
        # Whisper's k projection has no bias (ctranslate2 stores zeros). Even a non-zero one would add the
        # same q.b to every key's score, which softmax ignores, so dropping it is exact.
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}.self_attn.{proj}.weight"] = qkv_w[j * d:(j + 1) * d]
            if proj != "k_proj":
                state[f"{dst}.self_attn.{proj}.bias"] = qkv_b[j * d:(j + 1) * d]
        pairs = {"self_attn.out_proj": "self_attention/linear_1", "fc1": "ffn/linear_0", "fc2": "ffn/linear_1"}
        for ours, theirs in pairs.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/weight")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/bias")
        for ours, theirs in {"self_attn_layer_norm": "self_attention/layer_norm",
                             "final_layer_norm": "ffn/layer_norm"}.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/gamma")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/beta")
    return state


def load_ct2_whisper_encoder(model_dir_or_bin) -> WhisperEncoder:
    """A frozen float32 Whisper encoder from a CTranslate2 Whisper directory or its model.bin."""
    import torch

    path = _model_bin(model_dir_or_bin)
    variables = read_ct2(path, spec=WHISPER_SPEC)
    cfg = encoder_config_from_ct2(variables)
    encoder = WhisperEncoder(cfg)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    state = encoder_state_from_ct2(variables, cfg)
    assert state.keys() == expected.keys(), sorted(state.keys() ^ expected.keys())
    for name, value in state.items():
        if value.shape != expected[name]:
            raise ValueError(f"{path}: {name} has shape {list(value.shape)}, expected {list(expected[name])} "
                             f"for {cfg}")
    encoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    log.info("loaded Whisper encoder from %s: %d layers, d_model %d, %d heads, %d mels", path, cfg.n_layers,
             cfg.d_model, cfg.n_heads, cfg.n_mels)
    return encoder.eval().requires_grad_(False)
