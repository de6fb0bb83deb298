"""The modal adaptor: Whisper encoder frames -> rows in the LLM's input-embedding space."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ADAPTOR_KINDS = ("stack-mlp",)


@dataclass(frozen=True)
class AdaptorConfig:
    d_encoder: int
    d_llm: int
    kind: str = "stack-mlp"
    stack_factor: int = 4
    hidden: int = 0  # 0: d_llm

    def __post_init__(self):
        if self.kind not in ADAPTOR_KINDS:
            raise ValueError(f"adaptor kind must be one of {ADAPTOR_KINDS}, got {self.kind!r}")
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, got {self.stack_factor}")

    def to_dict(self) -> dict:
        return asdict(self)


class StackMLPAdaptor(nn.Module):
    """Stack k encoder frames (zero-padded to a multiple of k), 2-layer MLP, begin/end rows around them.

    The stacking + first Linear is one Conv1d with kernel k and stride k: the same arithmetic, and it exports
    to ONNX without shape arithmetic.
    """

    def __init__(self, cfg: AdaptorConfig, embed_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden or cfg.d_llm
        self.stack = nn.Conv1d(cfg.d_encoder, hidden, kernel_size=cfg.stack_factor, stride=cfg.stack_factor)
        self.out = nn.Linear(hidden, cfg.d_llm)
        self.boundary = nn.Parameter(torch.randn(2, cfg.d_llm) * embed_std)  # begin, end of audio
        nn.init.normal_(self.out.weight, std=embed_std / hidden ** 0.5)  # rows start at the token embeddings' scale
        nn.init.zeros_(self.out.bias)

    def n_rows(self, n_frames: torch.Tensor) -> torch.Tensor:
        """Rows (boundaries included) for n_frames encoder frames."""
        k = self.cfg.stack_factor
        return (n_frames + k - 1) // k + 2

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, C) encoder frames, zero past each item's end -> (B, ceil(T / k) + 2, D).

        For an item shorter than T, its rows are [0, n_rows(n) - 1) followed by its end row, which the
        caller takes with `rows`.
        """
        k = self.cfg.stack_factor
        x = F.pad(frames.transpose(1, 2), (0, k - 1))  # (B, C, T + k - 1)
        x = self.out(F.gelu(self.stack(x).transpose(1, 2)))  # (B, ceil(T/k), D)
        B = x.shape[0]
        begin = self.boundary[0].expand(B, 1, -1)
        end = self.boundary[1].expand(B, 1, -1)
        return torch.cat([begin, x, end], dim=1)

    def rows(self, frames: torch.Tensor, n_frames: torch.Tensor) -> list[torch.Tensor]:
        """Per item of a padded batch: (n_rows_i, D), begin and end rows included."""
        full = self.forward(frames)
        out = []
        for i, n in enumerate(self.n_rows(n_frames).tolist()):
            out.append(torch.cat([full[i, : n - 1], full[i, -1:]], dim=0))
        return out


def build_adaptor(cfg: AdaptorConfig, embed_std: float = 0.02) -> nn.Module:
    if cfg.kind == "stack-mlp":
        return StackMLPAdaptor(cfg, embed_std)
    raise ValueError(f"adaptor kind must be one of {ADAPTOR_KINDS}, got {cfg.kind!r}")
