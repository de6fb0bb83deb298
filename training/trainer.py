"""The two-stage LLaSM trainer.

Stage 1 (modality adaptation): encoder and LLM frozen; the adaptor learns on ASR pairs.
Stage 2 (cross-modal instruction tuning): encoder frozen; adaptor + LLM (LoRA by default, or full) learn on
conversations whose user turns are speech, text or both. Loss on assistant tokens only.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adaptor import AdaptorConfig
from .base import load_llm, load_whisper, prompt_format
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Collator, read_manifest
from .model import LLaSMConfig, LLaSMModel

log = logging.getLogger(__name__)

LLM_MODES = ("lora", "full")


@dataclass
class TrainConfig:
    stage: int
    data: str  # JSONL manifest
    out: str  # checkpoint directory
    whisper: str = ""  # base Whisper (transformers dir); stage 1
    llm: str = ""  # base LLM (transformers dir or .gguf); stage 1
    init: str = ""  # checkpoint to start from (stage 2 starts from stage 1's)
    stack_factor: int = 4
    adaptor_hidden: int = 0
    llm_mode: str = "lora"  # stage 2
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    seed: int = 0
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.llm_mode not in LLM_MODES:
            raise ValueError(f"llm_mode must be one of {LLM_MODES}, got {self.llm_mode!r}")
        if self.stage == 1 and not self.init and not (self.whisper and self.llm):
            raise ValueError("stage 1 needs base models: whisper and llm paths (or init)")
        if self.stage == 2 and not (self.init or (self.whisper and self.llm)):
            raise ValueError("stage 2 needs init (a stage-1 checkpoint) or base models")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")


def build_model(cfg: TrainConfig) -> tuple[LLaSMModel, object, dict]:
    """A fresh model (from base models) or one loaded from cfg.init; -> (model, tokenizer, base paths)."""
    if cfg.init:
        model, tokenizer, ckpt = load_checkpoint(cfg.init)
        if hasattr(model.llm, "peft_config"):
            model.llm = model.llm.merge_and_unload()
        return model, tokenizer, ckpt["base"]
    encoder = load_whisper(cfg.whisper)
    llm, tokenizer = load_llm(cfg.llm)
    mcfg = LLaSMConfig(
        encoder=encoder.cfg,
        adaptor=AdaptorConfig(d_encoder=encoder.cfg.d_model, d_llm=llm.config.hidden_size,
                              stack_factor=cfg.stack_factor, hidden=cfg.adaptor_hidden),
        prompt=prompt_format(tokenizer), llm_arch=llm.config.model_type)
    return LLaSMModel(mcfg, encoder, llm), tokenizer, {"whisper": cfg.whisper, "llm": cfg.llm}


def set_trainable(model: LLaSMModel, cfg: TrainConfig) -> str:
    """Freeze what the stage keeps fixed; -> the LLM mode written to the checkpoint."""
    model.requires_grad_(False)
    model.adaptor.requires_grad_(True)
    if cfg.stage == 1:
        return "frozen"
    if cfg.llm_mode == "full":
        model.llm.requires_grad_(True)
        return "full"
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                      lora_dropout=0.0, bias="none")
    model.llm = get_peft_model(model.llm, lora)
    return "lora"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig) -> Path:
    """Run one stage; writes and returns the checkpoint directory."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tokenizer, base = build_model(cfg)
    llm_mode = set_trainable(model, cfg)
    device = _device(cfg.device)
    model.to(device).train()
    model.encoder.eval()
    examples = read_manifest(cfg.data, model.cfg.transcribe_instruction)
    collate = Collator(tokenizer, model.cfg.prompt, model.cfg.geometry)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    log.info("stage %d: %d examples, %d trainable parameters (%s)", cfg.stage, len(examples),
             sum(p.numel() for p in params), llm_mode)
    order: list[int] = []
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    history = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = collate([examples[i] for i in order[: cfg.batch_size]]).to(device)
        del order[: cfg.batch_size]
        loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step == 0:
            log.info("step %d/%d loss %.4f (%.2f steps/s)", step + 1, cfg.steps, history[-1],
                     (step + 1) / (time.perf_counter() - t0))
    model.eval()
    info = {"config": asdict(cfg), "steps": cfg.steps, "loss": history}
    return save_checkpoint(model, cfg.out, base, info, llm_mode)
