"""Whisper's audio encoder, run on the real speech length (the positional table is sliced, no 30 s padding),
and Whisper's text decoder, run over fixed query rows (the LLaSM "llasm-query" adaptor reads the audio with it).

Parameter names follow transformers' WhisperEncoder and WhisperDecoder, so their state dicts load as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .whisper_config import WhisperDecoderConfig, WhisperEncoderConfig  # noqa: F401 (re-exported)


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x, or cross-attention from x to context (B, S, C); mask: True where allowed."""
        context = x if context is None else context
        B, T, C = x.shape
        S = context.shape[1]
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, C/H)
        k, v = (p(context).view(B, S, H, C // H).transpose(1, 2) for p in (self.k_proj, self.v_proj))  # (B, H, S, C/H)
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


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: WhisperDecoderConfig):
        super().__init__()
        self.self_attn = _Attention(cfg.d_model, cfg.n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = _Attention(cfg.d_model, cfg.n_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, frames: torch.Tensor, causal: torch.Tensor,
                keys: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), keys, frames)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    """Whisper's decoder without its token table: it takes query embeddings instead of token ids."""

    def __init__(self, cfg: WhisperDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_positions = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q, C) query embeddings at positions 0..Q-1, (B, T, C) encoder frames -> (B, Q, C).

        frame_mask (B, T): True for real frames of a padded batch; padded frames get no attention, so each
        item's output equals running it alone. Causal self-attention among the queries, as in Whisper.
        """
        Q = queries.shape[1]
        if Q > self.cfg.n_positions:
            raise ValueError(f"{Q} queries, the decoder keeps {self.cfg.n_positions} positions")
        x = queries + self.embed_positions.weight[:Q]
        i = torch.arange(Q, device=x.device)
        causal = i[None, :] <= i[:, None]  # (Q, Q): query q sees queries 0..q
        keys = None if frame_mask is None else frame_mask[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, frames, causal, keys)
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


def decoder_config_from_hf(config, n_positions: int) -> WhisperDecoderConfig:
    """From a transformers WhisperConfig, keeping the first n_positions positions."""
    if n_positions > config.max_target_positions:
        raise ValueError(f"{n_positions} queries, the Whisper decoder has {config.max_target_positions} positions")
    return WhisperDecoderConfig(d_model=config.d_model, n_layers=config.decoder_layers,
                                n_heads=config.decoder_attention_heads, ffn_dim=config.decoder_ffn_dim,
                                n_positions=n_positions)


def decoder_state_from_hf(state: dict, n_positions: int) -> dict:
    """Our WhisperDecoder's state dict from a transformers Whisper state dict (token table left out)."""
    out = {}
    for name, tensor in state.items():
        for prefix in ("model.decoder.", "decoder."):
            if name.startswith(prefix):
                out[name[len(prefix):]] = tensor
    if not out:
        raise ValueError("state dict has no Whisper decoder weights (expected keys under 'decoder.')")
    out.pop("embed_tokens.weight", None)
    out["embed_positions.weight"] = out["embed_positions.weight"][:n_positions]
    return out


def load_whisper_encoder(path) -> WhisperEncoder:
    """A frozen Whisper encoder from a transformers Whisper directory."""
    from transformers import WhisperConfig, WhisperModel

    hf = WhisperModel.from_pretrained(str(path))
    encoder = WhisperEncoder(encoder_config_from_hf(WhisperConfig.from_pretrained(str(path))))
    encoder.load_state_dict(encoder_state_from_hf(hf.state_dict()))
    return encoder.eval().requires_grad_(False)


def load_hf_whisper_decoder(path, n_queries: int) -> tuple[WhisperDecoder, torch.Tensor]:
    """A frozen Whisper decoder from a transformers Whisper directory, and its n_queries query rows (Q, C):
    the decoder-start token's embedding (transformers scales nothing), once per position."""
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig.from_pretrained(str(path))
    hf = WhisperModel.from_pretrained(str(path))
    state = hf.state_dict()
    sot = config.decoder_start_token_id
    table = state["decoder.embed_tokens.weight"]
    if sot is None or not 0 <= sot < table.shape[0]:
        raise ValueError(f"{path}: decoder_start_token_id {sot} is not a row of the {table.shape[0]}-token table")
    decoder = WhisperDecoder(decoder_config_from_hf(config, n_queries))
    decoder.load_state_dict(decoder_state_from_hf(state, n_queries))
    queries = table[sot].detach().float().clone().expand(n_queries, -1).contiguous()  # (Q, C)
    return decoder.eval().requires_grad_(False), queries
