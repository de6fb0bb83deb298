"""Whisper's decoder taught the training voices: a LoRA on its projections, trained on ASR pairs with Whisper's own
prompt ([<|startoftranscript|>, <|lang|>, <|transcribe|>, <|notimestamps|>] + the sentence + <|endoftext|>) over the
frozen encoder's frames of the clip as the runtime hears it (real length + pad_seconds of silence).

Only the decoder's own projections learn (TARGETS): the cross-attention keys and values are computed in the encoder
graph, so encoder_attn.k_proj and v_proj stay as they are. The result (whisper_lora.py) goes into the bundle's
decoder graph behind a gate, open for the release's tuned languages only (export/whisper_onnx.py).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .whisper_lora import save_lora

log = logging.getLogger(__name__)

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
           "encoder_attn.q_proj", "encoder_attn.out_proj", "fc1", "fc2")


@dataclass
class TuneConfig:
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-3
    steps: int = 300
    batch: int = 16
    seed: int = 0
    pad_seconds: float = 0.5
    weight_decay: float = 0.0


class Lora(nn.Module):
    """y = W x + b + scale * B (A x); B starts at zero, so the wrapped linear starts as it was."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def add_lora(decoder: nn.Module, cfg: TuneConfig, targets=TARGETS) -> dict[str, Lora]:
    """Wrap every target linear of every layer; all other weights frozen. -> {"layers.i.target": Lora}."""
    decoder.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    wrapped = {}
    for i, layer in enumerate(decoder.layers):
        for t in targets:
            parent_name, _, attr = t.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            wrapped[f"layers.{i}.{t}"] = lora = Lora(getattr(parent, attr), cfg.rank, cfg.alpha / cfg.rank, gen)
            setattr(parent, attr, lora)
    return wrapped


def lora_pairs(wrapped: dict[str, Lora]) -> dict[str, np.ndarray]:
    out = {}
    for name, m in wrapped.items():
        out[f"{name}.lora_a"] = m.lora_a.detach().float().numpy()
        out[f"{name}.lora_b"] = m.lora_b.detach().float().numpy()
    return out


class WhisperText:
    """Whisper's tokenizer (tokenizer.json of the CTranslate2 directory) and its prompt for a language."""

    def __init__(self, whisper_dir):
        from tokenizers import Tokenizer

        path = Path(whisper_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{whisper_dir} has no tokenizer.json: expected a CTranslate2 Whisper directory")
        self.tok = Tokenizer.from_file(str(path))
        ids = {name: self.tok.token_to_id(f"<|{name}|>") for name in
               ("startoftranscript", "transcribe", "notimestamps", "endoftext")}
        if None in ids.values():
            raise ValueError(f"{whisper_dir}/tokenizer.json lacks Whisper's special tokens")
        self.ids = ids

    def prompt(self, lang: str) -> list[int]:
        lang_id = self.tok.token_to_id(f"<|{lang}|>")
        if lang_id is None:
            raise ValueError(f"Whisper has no language {lang!r}")
        return [self.ids["startoftranscript"], lang_id, self.ids["transcribe"], self.ids["notimestamps"]]

    def text(self, sentence: str, lang: str) -> list[int]:
        """The sentence's tokens as Whisper writes them: English after a space, Mandarin without one."""
        return self.tok.encode(sentence if lang == "zh" else " " + sentence.strip(), add_special_tokens=False).ids


def load_whisper(whisper_dir):
    """(frozen encoder, float32 decoder with every position, token table (V, D)) from a CTranslate2 directory."""
    from .ct2 import (_model_bin, decoder_config_from_ct2, decoder_state_from_ct2, float_variable,
                      load_ct2_whisper_encoder, read_ct2)
    from .whisper import WhisperDecoder

    variables = read_ct2(_model_bin(whisper_dir), spec="WhisperSpec")
    cfg = decoder_config_from_ct2(variables, variables["decoder/position_encodings/encodings"].shape[0])
    decoder = WhisperDecoder(cfg)
    decoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                             decoder_state_from_ct2(variables, cfg).items()})
    table = torch.from_numpy(np.ascontiguousarray(float_variable(variables, "decoder/embeddings/weight"), np.float32))
    return load_ct2_whisper_encoder(whisper_dir), decoder.eval(), table


@torch.no_grad()
def encode_clips(encoder, audio: list, pad_seconds: float) -> list[torch.Tensor]:
    """Each clip's encoder frames (S, D) float16, as the runtime hears it: the real length plus the pad."""
    from ..runtime.audio import SAMPLE_RATE, load_audio
    from ..runtime.features import log_mel

    out, pad = [], int(pad_seconds * SAMPLE_RATE)
    for i, path in enumerate(audio):
        mel = torch.from_numpy(log_mel(np.pad(load_audio(path), (0, pad)), encoder.cfg.n_mels))[None]
        out.append(encoder(mel)[0].half())
        if (i + 1) % 500 == 0:
            log.info("encoded %d / %d clips", i + 1, len(audio))
    return out


def batch_loss(decoder, table, frames: list[torch.Tensor], seqs: list[list[int]], n_prompt: int = 4) -> torch.Tensor:
    """Mean cross-entropy of each sequence's tokens after its n_prompt prompt tokens, given those and the frames."""
    B, S = len(seqs), max(f.shape[0] for f in frames)
    T = max(len(s) for s in seqs) - 1
    fr = torch.zeros(B, S, frames[0].shape[1])
    mask = torch.zeros(B, S, dtype=torch.bool)
    tokens = torch.zeros(B, T, dtype=torch.long)
    target = torch.full((B, T), -100, dtype=torch.long)
    for i, (f, s) in enumerate(zip(frames, seqs)):
        fr[i, :f.shape[0]], mask[i, :f.shape[0]] = f.float(), True
        tokens[i, :len(s) - 1] = torch.tensor(s[:-1])
        target[i, n_prompt - 1:len(s) - 1] = torch.tensor(s[n_prompt:])
    hidden = decoder(table[tokens], fr, mask)
    return F.cross_entropy((hidden @ table.T).flatten(0, 1), target.flatten())


def examples(manifests: list, whisper_dir) -> list[tuple[str, list[int]]]:
    """(audio path, Whisper's prompt + the sentence's tokens + <|endoftext|>) per ASR row of llasm-data manifests."""
    read = []
    for m in map(Path, manifests):
        try:
            read.append((m, m.read_text(encoding="utf-8").splitlines()))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the manifest {m}: {getattr(e, 'strerror', None) or e}") from None
    text = WhisperText(whisper_dir)
    out = []
    for m, lines in read:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                audio, sentence, lang = r["audio"], r["text"], r["lang"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{m}:{n}: not an ASR row with audio, text and lang") from None
            out.append((str(m.parent / audio), text.prompt(lang) + text.text(sentence, lang) + [text.ids["endoftext"]]))
    return out


def tune(whisper_dir, train: list, dev: list, out, cfg: TuneConfig, eval_every: int = 25) -> dict:
    """Train the LoRA on (audio, tokens) examples (see `examples`); the pairs of the lowest dev loss, checked every
    eval_every steps, are saved to `out`. -> {step, dev_loss, start_dev_loss, seconds, train, dev}."""
    if not train or not dev:
        raise ValueError(f"Whisper's LoRA needs training and dev clips; got {len(train)} and {len(dev)}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoder, decoder, table = load_whisper(whisper_dir)
    t0 = time.time()
    train_frames = encode_clips(encoder, [a for a, _ in train], cfg.pad_seconds)
    dev_frames = encode_clips(encoder, [a for a, _ in dev], cfg.pad_seconds)
    train_seqs, dev_seqs = [s for _, s in train], [s for _, s in dev]
    log.info("encoded %d + %d clips in %.0f s", len(train), len(dev), time.time() - t0)
    wrapped = add_lora(decoder, cfg)
    params = [p for m in wrapped.values() for p in (m.lora_a, m.lora_b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, min(20, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))

    @torch.no_grad()
    def dev_loss() -> float:
        total = 0.0
        for i in range(0, len(dev_seqs), 32):
            seqs = dev_seqs[i:i + 32]
            total += batch_loss(decoder, table, dev_frames[i:i + 32], seqs).item() * len(seqs)
        return total / max(len(dev_seqs), 1)

    start = dev_loss()
    best = {"step": 0, "dev_loss": start}
    log.info("step 0: dev loss %.4f", start)
    order: list[int] = []
    for step in range(1, cfg.steps + 1):
        while len(order) < cfg.batch:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[:cfg.batch], order[cfg.batch:]
        loss = batch_loss(decoder, table, [train_frames[i] for i in idx], [train_seqs[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == cfg.steps:
            d = dev_loss()
            log.info("step %d: train loss %.4f, dev loss %.4f (%.0f s)", step, loss.item(), d, time.time() - t0)
            if d < best["dev_loss"]:
                best = {"step": step, "dev_loss": d}
                save_lora(out, lora_pairs(wrapped), cfg.alpha / cfg.rank,
                          {"rank": cfg.rank, "alpha": cfg.alpha, "step": step, "dev_loss": d,
                           "targets": list(TARGETS), "pad_seconds": cfg.pad_seconds, "lr": cfg.lr,
                           "batch": cfg.batch, "seed": cfg.seed})
    return dict(best, start_dev_loss=start, seconds=round(time.time() - t0), train=len(train), dev=len(dev))
