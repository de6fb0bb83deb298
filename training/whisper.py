"""Whisper's audio encoder, run on the real speech length (the positional table is sliced, no 30 s padding).

Parameter names follow transformers' WhisperEncoder, so its state dict loads as is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class _Layer(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.self_attn = _Attention(cfg.d_model, cfg.n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, mel: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_mels, T) log-mel -> (B, ceil(T / 2), d_model).

        n_frames (B,): real lengths of a padded batch. Padded frames are zeroed after conv1 and masked
        in attention, so each item's output equals running it alone.
        """
        x = F.gelu(self.conv1(mel))  # (B, C, T)
        if n_frames is not None:
            keep = torch.arange(x.shape[-1], device=x.device)[None, :] < n_frames[:, None]
            x = x * keep[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', C)
        T = x.shape[1]
        if T > self.cfg.max_positions:
            raise ValueError(f"audio chunk has {T} encoder frames, the encoder takes at most {self.cfg.max_positions}")
        x = x + self.embed_positions.weight[:T]
        mask = None
        if n_frames is not None:
            n_enc = (n_frames - 1) // 2 + 1
            valid = torch.arange(T, device=x.device)[None, :] < n_enc[:, None]  # (B, T')
            mask = valid[:, None, None, :]  # (B, 1, 1, T'): keys only
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x)


def encoder_config_from_hf(config) -> WhisperEncoderConfig:
    """From a transformers WhisperConfig."""
    return WhisperEncoderConfig(n_mels=config.num_mel_bins, d_model=config.d_model, n_layers=config.encoder_layers,
                                n_heads=config.encoder_attention_heads, ffn_dim=config.encoder_ffn_dim,
                                max_positions=config.max_source_positions)


def encoder_state_from_hf(state: dict) -> dict:
    """The encoder part of a transformers WhisperModel / WhisperForConditionalGeneration state dict."""
    out = {}
    for name, tensor in state.items():
        for prefix in ("model.encoder.", "encoder."):
            if name.startswith(prefix):
                out[name[len(prefix):]] = tensor
    if not out:
        raise ValueError("state dict has no Whisper encoder weights (expected keys under 'encoder.')")
    return out


def load_whisper_encoder(path) -> WhisperEncoder:
    """A frozen Whisper encoder from a transformers Whisper directory."""
    from transformers import WhisperConfig, WhisperModel

    hf = WhisperModel.from_pretrained(str(path))
    encoder = WhisperEncoder(encoder_config_from_hf(WhisperConfig.from_pretrained(str(path))))
    encoder.load_state_dict(encoder_state_from_hf(hf.state_dict()))
    return encoder.eval().requires_grad_(False)
