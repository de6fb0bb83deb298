"""The modal adaptor: Whisper encoder frames -> rows in the LLM's input-embedding space.

Two kinds:
    stack-mlp     (default) stack k frames, 2-layer MLP: rows grow with the speech length (12.5/k per second)
    llasm-query   the original LLaSM design: Whisper's decoder reads the frames from 64 fixed query positions,
                  one Linear maps its output to the LLM: 64 rows per 30 s window, whatever the length
Both put learned begin/end-of-audio rows around the rows of each encoder pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .whisper import WhisperDecoder

ADAPTOR_KINDS = ("stack-mlp", "llasm-query")


@dataclass(frozen=True)
class AdaptorConfig:
    d_encoder: int
    d_llm: int
    kind: str = "stack-mlp"
    stack_factor: int = 8  # stack-mlp: 6.25 rows per second of speech (BENCHMARKS.md)
    hidden: int = 0  # stack-mlp; 0: d_llm
    n_queries: int = 64  # llasm-query: decoder positions read out per encoder pass
    train_decoder: bool = False  # llasm-query: fine-tune the Whisper decoder too (then it is saved)

    def __post_init__(self):
        if self.kind not in ADAPTOR_KINDS:
            raise ValueError(f"adaptor kind must be one of {ADAPTOR_KINDS}, got {self.kind!r}")
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, got {self.stack_factor}")
        if self.n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {self.n_queries}")
        if self.train_decoder and self.kind != "llasm-query":
            raise ValueError(f"train_decoder applies to the llasm-query adaptor only, kind is {self.kind!r}")

    @property
    def fixed_rows(self) -> int:
        """Rows per encoder pass that do not depend on its length (boundaries aside); 0: they grow with it."""
        return self.n_queries if self.kind == "llasm-query" else 0

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


class QueryAdaptor(nn.Module):
    """LLaSM's modal adaptor: Whisper's decoder over Q query positions (its start token at positions 0..Q-1),
    attending to the encoder frames; one Linear to the LLM width; begin/end rows around: Q + 2 rows per pass.

    The decoder is frozen unless cfg.train_decoder; the query rows are a stored buffer.
    """

    def __init__(self, cfg: AdaptorConfig, decoder: WhisperDecoder, queries: torch.Tensor, embed_std: float = 0.02):
        super().__init__()
        if queries.shape != (cfg.n_queries, cfg.d_encoder):
            raise ValueError(f"query rows have shape {list(queries.shape)}, expected [{cfg.n_queries}, "
                             f"{cfg.d_encoder}] (n_queries, d_encoder)")
        if decoder.cfg.d_model != cfg.d_encoder or decoder.cfg.n_positions < cfg.n_queries:
            raise ValueError(f"Whisper decoder has d_model {decoder.cfg.d_model} and {decoder.cfg.n_positions} "
                             f"positions, the adaptor needs {cfg.d_encoder} and {cfg.n_queries}")
        self.cfg = cfg
        self.decoder = decoder.requires_grad_(cfg.train_decoder)
        self.register_buffer("queries", queries.detach().clone().float())  # (Q, C)
        self.out = nn.Linear(cfg.d_encoder, cfg.d_llm)
        self.boundary = nn.Parameter(torch.randn(2, cfg.d_llm) * embed_std)  # begin, end of audio
        nn.init.normal_(self.out.weight, std=embed_std / cfg.d_encoder ** 0.5)  # rows start at the embeddings' scale
        nn.init.zeros_(self.out.bias)

    def n_rows(self, n_frames: torch.Tensor) -> torch.Tensor:
        """Rows (boundaries included) for n_frames encoder frames: the same for every length."""
        return torch.full_like(n_frames, self.cfg.n_queries + 2)

    def forward(self, frames: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) encoder frames -> (B, Q + 2, D). n_frames (B,): real lengths of a padded batch."""
        B, T, _ = frames.shape
        mask = None
        if n_frames is not None:
            mask = torch.arange(T, device=frames.device)[None, :] < n_frames[:, None]  # (B, T)
        x = self.decoder(self.queries.to(frames.dtype).expand(B, -1, -1), frames, mask)  # (B, Q, C)
        x = self.out(x)  # (B, Q, D)
        begin = self.boundary[0].expand(B, 1, -1)
        end = self.boundary[1].expand(B, 1, -1)
        return torch.cat([begin, x, end], dim=1)

    def rows(self, frames: torch.Tensor, n_frames: torch.Tensor) -> list[torch.Tensor]:
        """Per item of a padded batch: (Q + 2, D), begin and end rows included."""
        return list(self.forward(frames, n_frames))


def build_adaptor(cfg: AdaptorConfig, embed_std: float = 0.02, decoder: WhisperDecoder | None = None,
                  queries: torch.Tensor | None = None) -> nn.Module:
    """decoder, queries: the Whisper decoder and its query rows (base.load_whisper_decoder), for llasm-query."""
    if cfg.kind == "stack-mlp":
        return StackMLPAdaptor(cfg, embed_std)
    if cfg.kind == "llasm-query":
        if decoder is None or queries is None:
            raise ValueError("the llasm-query adaptor needs the Whisper decoder and its query rows "
                             "(base.load_whisper_decoder)")
        return QueryAdaptor(cfg, decoder, queries, embed_std)
    raise ValueError(f"adaptor kind must be one of {ADAPTOR_KINDS}, got {cfg.kind!r}")


def set_adaptor_trainable(adaptor: nn.Module) -> None:
    """Everything the adaptor learns gets gradients; a frozen Whisper decoder stays frozen."""
    adaptor.requires_grad_(True)
    if isinstance(adaptor, QueryAdaptor) and not adaptor.cfg.train_decoder:
        adaptor.decoder.requires_grad_(False)


def saved_state(adaptor: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the adaptor: all of it but a frozen Whisper decoder (reloaded from the base)."""
    state = adaptor.state_dict()
    if isinstance(adaptor, QueryAdaptor) and not adaptor.cfg.train_decoder:
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    return state
