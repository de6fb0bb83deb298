"""Whisper's geometry as our modules and graphs use it: torch-free, so that reading CTranslate2 weights and building
ONNX graphs from them (export/whisper_onnx.py, the default bundle's first-use build) needs no torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WhisperEncoderConfig:
    n_mels: int = 80
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    ffn_dim: int = 2048
    max_positions: int = 1500

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128, got {self.n_mels}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WhisperDecoderConfig:
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    ffn_dim: int = 2048
    n_positions: int = 64  # rows of the positional table kept: the queries sit at positions 0..n_positions-1

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_positions < 1:
            raise ValueError(f"n_positions must be >= 1, got {self.n_positions}")

    def to_dict(self) -> dict:
        return asdict(self)
