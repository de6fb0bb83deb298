"""The two-stage LLaSM trainer.

Stage 1 (modality adaptation): encoder and LLM frozen; the adaptor learns on ASR pairs.
Stage 2 (cross-modal instruction tuning): encoder frozen; adaptor + LLM (LoRA by default, or full) learn on
conversations whose user turns are speech, text or both. Loss on assistant tokens only.

One code path for CPU and GPU (accelerate: device placement, bf16, several GPUs under `accelerate launch`).
A run saves an atomic checkpoint every `save_every` steps with its optimizer state; started again with the same
`out`, it resumes from there and continues exactly as the uninterrupted run would (the data order is a pure
function of seed and step).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adaptor import ADAPTOR_KINDS, AdaptorConfig, set_adaptor_trainable
from .base import load_llm, load_whisper, load_whisper_decoder, prompt_format
from .checkpoint import TRAINER_STATE, load_checkpoint, read_config, save_checkpoint
from .ctc import CTCHead, ctc_rows_and_targets
from .data import Collator, read_manifest
from .model import EncoderCache, LLaSMConfig, LLaSMModel

log = logging.getLogger(__name__)

# Fields added after runs were made: at these defaults they stay out of the digest, so those runs still resume.
_LATER_FIELDS = {"adaptor": "stack-mlp", "n_queries": 64, "train_decoder": False, "group_by_length": False,
                 "ctc_weight": 0.0, "ctc_head_lr": 0.0}
GROUP_SPAN = 32  # group_by_length sorts within windows of this many batches
MAX_BAD_STEPS = 20  # non-finite gradients in a row that end a run (single ones are skipped: bf16 on a GPU had them)
LLM_MODES = ("lora", "full", "frozen")  # stage 2; frozen: only the adaptor learns, the LLM ships untouched
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    stage: int
    data: str | list  # JSONL manifest(s)
    out: str  # checkpoint directory
    whisper: str = ""  # base Whisper: transformers dir, CT2 dir, or package:NAME
    llm: str = ""  # base LLM: transformers dir, .gguf file, or package:NAME
    init: str = ""  # checkpoint to start from (stage 2 starts from stage 1's)
    adaptor: str = "stack-mlp"  # or llasm-query (LLaSM's original: Whisper's decoder over fixed queries)
    stack_factor: int = 8  # stack-mlp: 6.25 rows per second of speech (BENCHMARKS.md)
    adaptor_hidden: int = 0  # stack-mlp
    n_queries: int = 64  # llasm-query
    train_decoder: bool = False  # llasm-query
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
    save_every: int = 200
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 elsewhere
    gradient_checkpointing: bool = False
    workers: int = 0  # data-loading processes
    objective: str = "llm"  # llm: next-token loss through the LLM; ctc: warm start against token embeddings
    ctc_weight: float = 0.0  # objective llm: adds this x the CTC loss of the ASR rows' adaptor rows (same head as
    #                          objective ctc), so that the rows keep spelling their words while the LLM learns;
    #                          the logged and held-out losses stay the LLM's, the term is logged as ctc_loss
    ctc_head_lr: float = 0.0  # learning rate of the CTC head (blank direction, logit scale); 0: lr
    cache_encoder: bool = True  # keep frozen-encoder outputs (CPU) so later epochs skip the encoder
    group_by_length: bool = False  # batches of similar length: less padding (62% -> 98% of positions used here)
    eval_data: str | list = ""  # manifest(s) never trained on: their mean loss is logged at every save and kept
    keep_best: bool = False  # with eval_data: also keep the checkpoint of lowest loss on it, in `<out>-best`; choose
    #                          by a dev split (llasm-data --dev), so that the held-out figures stay unbiased

    def __post_init__(self):
        if self.adaptor not in ADAPTOR_KINDS:
            raise ValueError(f"adaptor must be one of {ADAPTOR_KINDS}, got {self.adaptor!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.llm_mode not in LLM_MODES:
            raise ValueError(f"llm_mode must be one of {LLM_MODES}, got {self.llm_mode!r}")
        if self.objective not in ("llm", "ctc"):
            raise ValueError(f"objective must be llm or ctc, got {self.objective!r}")
        if self.objective == "ctc" and self.stage != 1:
            raise ValueError("the ctc objective is a stage-1 warm start (stage = 1)")
        if self.ctc_weight < 0 or self.ctc_head_lr < 0:
            raise ValueError(f"ctc_weight and ctc_head_lr must be >= 0, got {self.ctc_weight}, {self.ctc_head_lr}")
        if self.ctc_weight and self.objective == "ctc":
            raise ValueError("ctc_weight adds CTC to the llm objective; objective = \"ctc\" is CTC alone")
        if self.ctc_head_lr and not (self.ctc_weight or self.objective == "ctc"):
            raise ValueError("ctc_head_lr is the CTC head's learning rate, and this run has none: set ctc_weight")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.init and not (self.whisper and self.llm):
            raise ValueError(f"stage {self.stage} needs base models (whisper and llm) or init (a checkpoint)")
        if self.keep_best and not self.eval_data:
            raise ValueError("keep_best needs eval_data (held-out manifests to choose by)")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError(f"steps, batch_size and save_every must be >= 1, got "
                             f"{self.steps}, {self.batch_size}, {self.save_every}")

    def digest(self) -> str:
        """Hash of what decides the result (not where it is written, how often it logs, or how long it runs:
        the schedule is warmup then constant, so raising `steps` continues a run exactly)."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("out", "log_every", "save_every", "workers", "steps", "cache_encoder", "eval_data",
                             "keep_best")
                and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def build_model(cfg: TrainConfig) -> tuple[LLaSMModel, object, dict]:
    """A fresh model (from base models) or one loaded from cfg.init; -> (model, tokenizer, base specs)."""
    if cfg.init:
        model, tokenizer, ckpt = load_checkpoint(cfg.init, trainable=True)
        if hasattr(model.llm, "peft_config") and learned_llm_mode(cfg) == "full":
            model.llm = model.llm.merge_and_unload()  # the whole LLM is trained and saved: the LoRA goes in it
        return model, tokenizer, ckpt["base"]
    encoder = load_whisper(cfg.whisper)
    decoder = queries = None
    if cfg.adaptor == "llasm-query":
        decoder, queries = load_whisper_decoder(cfg.whisper, cfg.n_queries)
    llm, tokenizer = load_llm(cfg.llm)
    mcfg = LLaSMConfig(
        encoder=encoder.cfg,
        adaptor=AdaptorConfig(d_encoder=encoder.cfg.d_model, d_llm=llm.config.hidden_size, kind=cfg.adaptor,
                              stack_factor=cfg.stack_factor, hidden=cfg.adaptor_hidden, n_queries=cfg.n_queries,
                              train_decoder=cfg.train_decoder),
        prompt=prompt_format(tokenizer), llm_arch=llm.config.model_type)
    return LLaSMModel(mcfg, encoder, llm, decoder, queries), tokenizer, {"whisper": cfg.whisper, "llm": cfg.llm}


def learned_llm_mode(cfg: TrainConfig) -> str:
    """What of the LLM this stage trains: nothing (frozen, as in every stage 1), a LoRA, or all of it."""
    return "frozen" if cfg.stage == 1 else cfg.llm_mode


def set_trainable(model: LLaSMModel, cfg: TrainConfig) -> str:
    """Wrap the LLM in LoRA when the stage trains it so, then freeze; -> the LLM mode written to the checkpoint.
    A LoRA that came with cfg.init stays the model's one adapter (a checkpoint names a base LLM and at most one
    LoRA): a LoRA stage trains it on, a stage that leaves the LLM frozen keeps it as it is and saves it."""
    mode = learned_llm_mode(cfg)
    if hasattr(model.llm, "peft_config"):
        if mode == "lora":
            _check_lora_shape(model.llm.peft_config["default"], cfg)
        freeze_for(model, mode)
        return "lora"
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                          lora_dropout=0.0, bias="none")
        model.llm = get_peft_model(model.llm, lora)
    freeze_for(model, mode)
    return mode


def _check_lora_shape(have, cfg: TrainConfig) -> None:
    targets = sorted(have.target_modules)
    if (have.r, have.lora_alpha, targets) != (cfg.lora_rank, cfg.lora_alpha, sorted(cfg.lora_targets)):
        raise ValueError(f"{cfg.init} holds a rank-{have.r} LoRA (alpha {have.lora_alpha}, on {', '.join(targets)}) "
                         f"that this stage would train on, but the run asks for rank {cfg.lora_rank}, alpha "
                         f"{cfg.lora_alpha}, on {', '.join(sorted(cfg.lora_targets))}: set lora_rank, lora_alpha and "
                         "lora_targets to match, or llm_mode = \"full\"")


def freeze_for(model: LLaSMModel, llm_mode: str) -> None:
    """Only the adaptor (and, by llm_mode, the whole LLM or its LoRA weights) learns; the encoder never does."""
    model.requires_grad_(False)
    set_adaptor_trainable(model.adaptor)
    if llm_mode == "full":
        model.llm.requires_grad_(True)
    elif llm_mode == "lora":
        for name, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in name)


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int, lengths=None) -> list[int]:
    """Example indices of one step: epochs of seeded permutations, a pure function of the step. With lengths,
    each window of GROUP_SPAN batches of the permutation is sorted by length, cut into batches, and the epoch's
    batches are shuffled (the remainder that fills no batch waits for the next epoch's shuffle)."""
    if lengths is not None and n_examples >= batch_size:
        per_epoch = n_examples // batch_size
        epoch, k = divmod(step, per_epoch)
        return _grouped_epoch(n_examples, batch_size, seed, epoch, tuple(lengths))[k]
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_examples)
        perm = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = perm[offset: offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


@functools.lru_cache(maxsize=2)
def _grouped_epoch(n_examples: int, batch_size: int, seed: int, epoch: int, lengths: tuple) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + epoch)
    perm = list(range(n_examples))
    rng.shuffle(perm)
    span = batch_size * GROUP_SPAN
    order = [i for w in range(0, len(perm), span) for i in sorted(perm[w: w + span], key=lambda i: -lengths[i])]
    batches = [order[b: b + batch_size] for b in range(0, n_examples - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def example_length(ex) -> float:
    """An example's rough sequence length for grouping: seconds of audio (header only) and characters of text."""
    import soundfile as sf

    n = 0.0
    for turn in ex.turns:
        for part in turn.parts:
            n += len(part) / 3.0 if isinstance(part, str) else sf.info(str(part)).duration * 9.0
    return n


def _resume_state(cfg: TrainConfig) -> dict | None:
    """The trainer state in cfg.out if it belongs to this same run; None for a fresh start."""
    out = Path(cfg.out)
    if not (out / TRAINER_STATE).is_file():
        return None
    ckpt = read_config(out)
    if ckpt.get("train", {}).get("digest") != cfg.digest():
        raise ValueError(f"{out} holds a checkpoint of a different run (other config); choose another out")
    if ckpt["train"]["step"] >= cfg.steps:
        raise ValueError(f"{out} already holds this run at step {ckpt['train']['step']}; raise steps to continue it")
    return torch.load(out / TRAINER_STATE, weights_only=False)


def train(cfg: TrainConfig, on_step=None) -> Path:
    """Run (or resume) one stage; writes and returns the checkpoint directory. on_step(step, loss): a hook."""
    from accelerate import Accelerator

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    resume = _resume_state(cfg)
    if resume:
        model, tokenizer, ckpt = load_checkpoint(cfg.out, trainable=True)
        base, llm_mode, history = ckpt["base"], ckpt["llm_mode"], ckpt["train"]["loss"]
        freeze_for(model, learned_llm_mode(cfg))
        log.info("resuming %s from step %d", cfg.out, resume["step"])
    else:
        model, tokenizer, base = build_model(cfg)
        llm_mode = set_trainable(model, cfg)
        history = []
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
        if hasattr(model.llm, "enable_input_require_grads"):
            model.llm.enable_input_require_grads()
    examples = _examples(cfg.data, model, learned_llm_mode(cfg))
    if not examples:
        raise ValueError(f"no usable training rows in {cfg.data}")
    held_out = _examples(cfg.eval_data, model, learned_llm_mode(cfg)) if cfg.eval_data else []
    evals = list(ckpt["train"].get("eval", [])) if resume else []
    collate = Collator(tokenizer, model.cfg.prompt, model.cfg.geometry)
    lengths = [example_length(ex) for ex in examples] if cfg.group_by_length else None
    head = None
    if cfg.objective == "ctc" or cfg.ctc_weight:
        with torch.no_grad():
            # as an auxiliary loss, CTC leaves the rows' size alone (cosine): the LLM has learnt to read them at
            # theirs (the release's are ~86x a token embedding's)
            head = CTCHead(model.embed_tokens(torch.arange(model.llm.config.vocab_size)),
                           norm_weight=0.0 if cfg.ctc_weight else 0.1).to(acc.device)
        if resume:
            head.load_state_dict(resume["ctc_head"])
        n_end = len(collate.tokens(model.cfg.prompt.end_of_turn))
    trained = [p for p in model.parameters() if p.requires_grad]
    head_params = list(head.parameters()) if head else []
    params = trained + head_params
    groups = params  # one group unless the head has a learning rate of its own: earlier CTC runs resume as they were
    if head_params and cfg.ctc_head_lr:
        groups = [{"params": trained}, {"params": head_params, "lr": cfg.ctc_head_lr}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    start = 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        start = resume["step"]
    if cfg.cache_encoder:
        model.encoder_cache = EncoderCache()
    model, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(model)
    inner.train()
    inner.encoder.eval()
    log.info("stage %d: %d examples, %d trainable parameters (%s), %s on %s", cfg.stage, len(examples),
             sum(p.numel() for p in params), llm_mode, precision, acc.device)
    n_items = bad_run = 0
    skipped = list(ckpt["train"].get("skipped", [])) if resume else []
    ctc_history = list(ckpt["train"].get("ctc_loss", [])) if resume else []  # ctc_weight: per step, None without ASR
    t0 = time.perf_counter()
    bar = _progress(cfg.steps, start, acc.is_main_process)

    def batch_loss(rows, aux: bool = False):
        """-> the objective's mean loss over rows, or with aux (loss, CTC loss of the rows' ASR samples or None)."""
        batch = collate(rows).to(acc.device)
        with acc.autocast():
            if cfg.objective == "ctc":
                loss = head.loss(*ctc_rows_and_targets(inner, batch, n_end))
            elif not (aux and cfg.ctc_weight):
                loss = model(batch)
            else:  # one pass of the adaptor for both losses
                loss, chunk_rows = model(batch, return_rows=True)
                asr = [i for i, ex in enumerate(rows) if ex.asr]
                ctc = head.loss(*ctc_rows_and_targets(inner, batch, n_end, chunk_rows, asr)) if asr else None
                return loss, ctc
        return (loss, None) if aux else loss

    def evaluate(step):
        if held_out and acc.is_main_process:
            evals.append([step, held_out_loss(inner, held_out, batch_loss, cfg.batch_size)])
            log.info("step %d held-out loss %.4f (%d rows)", step, evals[-1][1], len(held_out))
            if cfg.keep_best and evals[-1][1] <= min(e[1] for e in evals):
                save_checkpoint(inner, best_dir(cfg), base, _info(cfg, step, history, evals, skipped, ctc=ctc_history),
                                llm_mode)

    for step in range(start, cfg.steps):
        rows = [examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed, step, lengths)]
        loss, ctc = batch_loss(rows, aux=True)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss if ctc is None else loss + cfg.ctc_weight * ctc)
        if torch.isfinite(acc.clip_grad_norm_(params, 1.0)):
            opt.step()
            bad_run = 0
        else:  # an overflow in this step's backward: keep the weights as they are, as AMP's loss scaler does
            skipped.append(step + 1)
            bad_run += 1
            log.warning("step %d: non-finite gradient, step skipped (%d so far)", step + 1, len(skipped))
            if bad_run >= MAX_BAD_STEPS:
                raise RuntimeError(f"{bad_run} steps in a row had non-finite gradients (up to step {step + 1}); "
                                   f"the run diverged: lower lr, or precision = \"fp32\" if it is {precision}")
        sched.step()
        history.append(float(loss.detach()))
        if cfg.ctc_weight:
            ctc_history.append(None if ctc is None else float(ctc.detach()))
        n_items += cfg.batch_size
        rate = n_items / (time.perf_counter() - t0)
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]:.3f}", samples_s=f"{rate:.2f}")
            bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log.info("step %d/%d loss %.4f%s, %.2f samples/s", step + 1, cfg.steps, history[-1],
                     "" if ctc is None else f" (+ ctc {ctc_history[-1]:.4f} x {cfg.ctc_weight:g})", rate)
        if on_step is not None:
            on_step(step + 1, history[-1])
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps and acc.is_main_process:
            evaluate(step + 1)
            _save(inner, cfg, base, llm_mode, history, step + 1, opt, sched, head=head, evals=evals,
                  skipped=skipped, ctc=ctc_history)
    if bar is not None:
        bar.close()
    samples_s = n_items / max(time.perf_counter() - t0, 1e-9)
    evaluate(cfg.steps)
    inner.eval()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return _save(inner, cfg, base, llm_mode, history, cfg.steps, opt, sched, head=head, evals=evals, skipped=skipped,
                 ctc=ctc_history, extra={"samples_per_s": samples_s, "peak_gpu_bytes": peak, "precision": precision})


def best_dir(cfg: TrainConfig) -> Path:
    """Where keep_best puts the checkpoint of lowest held-out loss (without trainer state: not resumable)."""
    return Path(f"{cfg.out}-best")


def _examples(manifests, model, llm_mode: str) -> list:
    examples = [ex for path in ([manifests] if isinstance(manifests, str) else manifests)
                for ex in read_manifest(path, model.cfg.transcribe_instruction)]
    if llm_mode == "frozen":  # text-only rows cannot reach the adaptor: skip their compute
        with_audio = [ex for ex in examples if any(not isinstance(p, str) for t in ex.turns for p in t.parts)]
        if len(with_audio) < len(examples):
            log.info("LLM frozen: skipping %d text-only rows", len(examples) - len(with_audio))
        examples = with_audio
    return examples


def held_out_loss(model: LLaSMModel, examples: list, batch_loss, batch_size: int) -> float:
    """Mean loss over examples in order (batch_loss(rows) -> mean loss of those rows), without gradients; the
    model goes back to training mode (its frozen encoder to eval) afterwards."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            rows = examples[i: i + batch_size]
            total += float(batch_loss(rows)) * len(rows)
    model.train()
    model.encoder.eval()
    return total / len(examples)


def _info(cfg: TrainConfig, step: int, history, evals=(), skipped=(), extra=None, ctc=()) -> dict:
    """The run's record in a checkpoint's config: settings, digest, step, losses, held-out losses, skipped steps,
    and with ctc_weight the auxiliary CTC loss of each step."""
    info = {"config": asdict(cfg), "digest": cfg.digest(), "step": step, "loss": list(history), **(extra or {})}
    if ctc:
        info["ctc_loss"] = list(ctc)
    if evals:
        info["eval"] = [list(e) for e in evals]
    if skipped:
        info["skipped"] = list(skipped)  # steps whose gradient was not finite
    return info


def _save(model, cfg, base, llm_mode, history, step, opt, sched, extra=None, head=None, evals=(),
          skipped=(), ctc=()) -> Path:
    info = _info(cfg, step, history, evals, skipped, extra, ctc)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if head is not None:
        state["ctc_head"] = head.state_dict()
    return save_checkpoint(model, cfg.out, base, info, llm_mode, trainer_state=state)


def _progress(total: int, start: int, show: bool):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", disable=None, leave=False)
