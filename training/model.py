"""LLaSM in torch: frozen Whisper encoder -> modal adaptor -> causal LM reading embeddings between text.

A batch holds every audio chunk of every sample as one padded log-mel tensor, and each sample as a list of
pieces: text (token ids + labels) or audio (indices of its chunks). Audio rows are spliced in between text
embeddings; no vocabulary token stands for audio.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.audio import AudioGeometry
from ..runtime.prompt import TRANSCRIBE_INSTRUCTION, PromptFormat
from .adaptor import AdaptorConfig, build_adaptor
from .whisper import WhisperDecoder, WhisperEncoder, WhisperEncoderConfig

IGNORE = -100  # label of positions that carry no loss


@dataclass(frozen=True)
class LLaSMConfig:
    encoder: WhisperEncoderConfig
    adaptor: AdaptorConfig
    prompt: PromptFormat
    llm_arch: str
    transcribe_instruction: str = TRANSCRIBE_INSTRUCTION

    @property
    def geometry(self) -> AudioGeometry:
        return AudioGeometry(n_mels=self.encoder.n_mels, stack_factor=self.adaptor.stack_factor,
                             fixed_rows=self.adaptor.fixed_rows)

    def to_dict(self) -> dict:
        return {"encoder": self.encoder.to_dict(), "adaptor": self.adaptor.to_dict(), "prompt": self.prompt.to_dict(),
                "llm_arch": self.llm_arch, "transcribe_instruction": self.transcribe_instruction}

    @classmethod
    def from_dict(cls, d: dict) -> "LLaSMConfig":
        return cls(encoder=WhisperEncoderConfig(**d["encoder"]), adaptor=AdaptorConfig(**d["adaptor"]),
                   prompt=PromptFormat.from_dict(d["prompt"]), llm_arch=d["llm_arch"],
                   transcribe_instruction=d.get("transcribe_instruction", TRANSCRIBE_INSTRUCTION))


@dataclass
class Batch:
    mel: torch.Tensor  # (A, n_mels, T) every audio chunk in the batch, zero-padded
    n_frames: torch.Tensor  # (A,) real log-mel frames per chunk
    items: list = field(default_factory=list)  # per sample: [("text", ids, labels) | ("audio", [chunk, ...])]
    keys: list = field(default_factory=list)  # per chunk: a stable name (path + chunk) for the encoder cache

    def to(self, device) -> "Batch":
        items = [[(p[0], p[1].to(device), p[2].to(device)) if p[0] == "text" else p for p in it] for it in self.items]
        return Batch(self.mel.to(device), self.n_frames.to(device), items, self.keys)


class EncoderCache:
    """Frozen-encoder outputs by chunk key, kept on the CPU: later epochs skip the encoder. float32, so a cached
    chunk gives what the encoder gives (to padding's 1e-6), and resumed runs match uninterrupted ones."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.frames: dict[str, torch.Tensor] = {}
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0

    def get(self, key):
        hit = self.frames.get(key) if key is not None else None
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, key, frames: torch.Tensor) -> None:
        size = frames.numel() * 4
        if key is not None and self.bytes + size <= self.max_bytes:
            self.frames[key] = frames.detach().to("cpu", torch.float32)
            self.bytes += size


class LLaSMModel(nn.Module):
    def __init__(self, cfg: LLaSMConfig, encoder: WhisperEncoder, llm: nn.Module,
                 decoder: WhisperDecoder | None = None, queries: torch.Tensor | None = None):
        """decoder, queries: Whisper's decoder and its query rows, for the llasm-query adaptor."""
        super().__init__()
        self.cfg = cfg
        self.encoder_cache: EncoderCache | None = None  # set by the trainer for frozen-encoder stages
        self.encoder = encoder
        self.llm = llm
        with torch.no_grad():
            embed_std = float(self.embed_tokens(torch.arange(min(1024, llm.config.vocab_size))).float().std())
        self.adaptor = build_adaptor(cfg.adaptor, embed_std, decoder, queries)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the LLM reads them (Gemma's scaling included by its embedding module)."""
        return self.llm.get_input_embeddings()(ids)

    def encode(self, mel: torch.Tensor, n_frames: torch.Tensor, keys=None) -> torch.Tensor:
        """(A, n_mels, T) -> (A, T', C) encoder frames; with an encoder_cache, known chunks skip the encoder."""
        cache = getattr(self, "encoder_cache", None)
        if cache is None or not keys or self.encoder.training or any(p.requires_grad for p in self.encoder.parameters()):
            return self.encoder(mel, n_frames)
        T = (mel.shape[-1] - 1) // 2 + 1
        cached = [cache.get(k) for k in keys]
        todo = [i for i, c in enumerate(cached) if c is None]
        out = mel.new_zeros(mel.shape[0], T, self.encoder.cfg.d_model)
        if todo:
            fresh = self.encoder(mel[todo], n_frames[todo])  # (len(todo), T, C)
            for j, i in enumerate(todo):
                n = int((n_frames[i] - 1) // 2 + 1)
                cache.put(keys[i], fresh[j, :n])
                out[i] = fresh[j]
        for i, c in enumerate(cached):
            if c is not None:
                out[i, : c.shape[0]] = c.to(out.dtype)
        return out

    def audio_rows(self, mel: torch.Tensor, n_frames: torch.Tensor, keys=None) -> list[torch.Tensor]:
        """(A, n_mels, T) chunks -> per chunk (rows, D), in the LLM's input-embedding space."""
        frames = self.encode(mel, n_frames, keys)  # (A, T', C), zero-independent of padding
        n_enc = (n_frames - 1) // 2 + 1
        keep = torch.arange(frames.shape[1], device=frames.device)[None, :] < n_enc[:, None]
        frames = frames * keep[..., None].to(frames.dtype)  # (A, T', C), zero past each end
        return self.adaptor.rows(frames, n_enc)

    def assemble(self, batch: Batch, rows=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L), right-padded. rows: the batch's
        audio_rows, when the caller has them already."""
        if rows is None:
            rows = self.audio_rows(batch.mel, batch.n_frames, batch.keys) if batch.mel.numel() else []
        seqs, labels = [], []
        for item in batch.items:
            parts, labs = [], []
            for piece in item:
                if piece[0] == "text":
                    parts.append(self.embed_tokens(piece[1]))
                    labs.append(piece[2])
                else:
                    audio = torch.cat([rows[i] for i in piece[1]], dim=0)
                    parts.append(audio.to(parts[0].dtype if parts else audio.dtype))
                    labs.append(torch.full((audio.shape[0],), IGNORE, dtype=torch.long, device=audio.device))
            seqs.append(torch.cat(parts, dim=0))
            labels.append(torch.cat(labs, dim=0))
        L = max(s.shape[0] for s in seqs)
        D = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), L, D)
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=embeds.device)
        lab = torch.full((len(seqs), L), IGNORE, dtype=torch.long, device=embeds.device)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            embeds[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            lab[i, : s.shape[0]] = l
        return embeds, mask, lab

    def shared_prefix(self, batch: Batch) -> int:
        """Leading text tokens that every sample shares and no loss reads (the system header): their keys and values
        are the same for every sample, so forward computes them once for the batch (with a trainable LLM, LoRA or
        full, their gradient is the sum over the samples, which the repeat gives). Not with activation checkpointing,
        under which transformers drops the cache."""
        if not batch.items or getattr(self.llm.get_decoder(), "gradient_checkpointing", False):
            return 0
        firsts = [item[0] for item in batch.items]
        if any(p[0] != "text" for p in firsts):
            return 0
        n = min(p[1].numel() for p in firsts)
        ids = firsts[0][1][:n]
        for p in firsts[1:]:
            differ = (p[1][:n] != ids[:n]).nonzero()
            n = int(differ[0]) if differ.numel() else n
        for p in firsts:  # the prefix and the position after it must carry no label
            labelled = (p[2] != IGNORE).nonzero()
            n = min(n, int(labelled[0]) - 1) if labelled.numel() else n
        return n if n > 1 else 0

    def forward(self, batch: Batch, return_rows: bool = False):
        """Mean next-token cross-entropy over labelled positions; logits only where the loss needs them. With
        return_rows: (loss, the audio rows of each chunk), for a second loss on the same rows."""
        n_prefix = self.shared_prefix(batch)
        rows = self.audio_rows(batch.mel, batch.n_frames, batch.keys) if batch.mel.numel() else []
        embeds, mask, labels = self.assemble(batch, rows)
        decoder = self.llm.get_decoder()
        if n_prefix:
            from transformers import DynamicCache

            trainable = any(p.requires_grad for p in self.llm.parameters())
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                cache = DynamicCache(config=self.llm.config)
                decoder(inputs_embeds=embeds[:1, :n_prefix], use_cache=True, past_key_values=cache)
                cache.batch_repeat_interleave(embeds.shape[0])
            hidden = decoder(inputs_embeds=embeds[:, n_prefix:], attention_mask=mask, past_key_values=cache,
                             use_cache=True).last_hidden_state
            labels = labels[:, n_prefix:]
        else:
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, L, D)
        target = labels[:, 1:]
        where = target != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][where])  # (N, V)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits.float(), target[where])
        return (loss, rows) if return_rows else loss

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """(1, L, D) input embeddings -> (1, L, V) logits (for parity checks)."""
        return self.llm(inputs_embeds=embeds).logits
