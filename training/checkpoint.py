"""Checkpoint directory: what training learned plus the config to rebuild the model around it.

    config.json            format, version, model config (LLaSMConfig), base model paths, training config
    adaptor.safetensors    the modal adaptor (a frozen Whisper decoder left out: it is reloaded from the base)
    lora/                  LoRA adapter of the LLM (peft format), when stage 2 used LoRA
    llm.safetensors        full LLM weights, when stage 2 fine-tuned the whole LLM

Written to a temporary sibling directory and renamed into place, so a kill never leaves half a checkpoint.
`average_checkpoints` writes the uniform average of runs that share their start and bases (a "model soup").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .adaptor import saved_state
from .base import load_llm, load_whisper, load_whisper_decoder
from .model import LLaSMConfig, LLaSMModel

TRAINER_STATE = "trainer_state.pt"  # optimizer, scheduler, step, RNG: for resuming; not needed to export
PEFT_CARD = Path("lora") / "README.md"  # peft's blank model card, naming a local path: never kept
FORMAT = "llasm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


def _is_peft(llm) -> bool:
    return hasattr(llm, "peft_config")


def save_checkpoint(model: LLaSMModel, out_dir, base: dict, train: dict | None = None, llm_mode: str = "frozen",
                    trainer_state: dict | None = None) -> Path:
    """llm_mode: 'frozen' (stage 1), 'lora' or 'full'. trainer_state: saved beside it, for resuming."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = _staging(out_dir)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in saved_state(model.adaptor).items()},
                  str(tmp / "adaptor.safetensors"))
        if llm_mode == "lora":
            # save_embedding_layers=False: we never resize the vocabulary, and "auto" makes peft ask the Hugging Face
            # Hub whether the base's config exists whenever its directory has no config.json (a GGUF base)
            model.llm.save_pretrained(str(tmp / "lora"), save_embedding_layers=False)
            (tmp / PEFT_CARD).unlink(missing_ok=True)
        elif llm_mode == "full":
            state = {k: v.detach().contiguous().cpu() for k, v in model.llm.state_dict().items()}
            if getattr(model.llm.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)
            save_file(state, str(tmp / "llm.safetensors"))
        elif llm_mode != "frozen":
            raise ValueError(f"llm_mode must be frozen, lora or full, got {llm_mode!r}")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        config = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "base": base,
                  "llm_mode": llm_mode, "train": train or {}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _staging(out_dir: Path) -> Path:
    """An empty temporary sibling of out_dir to write a checkpoint into before `_publish` renames it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    return tmp


def _load_weights(path: Path) -> dict:
    """A safetensors file's tensors; a missing or damaged file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename a finished temporary directory into place, replacing what was there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def average_checkpoints(paths, out_dir) -> Path:
    """The uniform average of the weights of checkpoints that share model config, bases and llm_mode: runs
    fine-tuned from one starting point (Wortsman et al. 2022, "model soups"). Every weight file is averaged
    (adaptor, LoRA, full LLM), other files come from the first checkpoint. No trainer state: the result exports,
    or starts another run as its init, but does not resume. Its config's train record lists the sources."""
    from safetensors.torch import save_file

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints, got {len(paths)}")
    configs = [read_config(p) for p in paths]
    for key in ("model", "base", "llm_mode"):
        for p, c in zip(paths[1:], configs[1:]):
            if c.get(key) != configs[0].get(key):
                raise CheckpointError(f"cannot average {paths[0]} and {p}: their {key!r} differ")
    weight_files = sorted(f.relative_to(paths[0]) for f in paths[0].rglob("*.safetensors"))
    for p in paths[1:]:
        found = sorted(f.relative_to(p) for f in p.rglob("*.safetensors"))
        if found != weight_files:
            raise CheckpointError(f"cannot average {paths[0]} and {p}: weight files {weight_files} vs {found}")
    out_dir = Path(out_dir)
    tmp = _staging(out_dir)
    try:
        for rel in weight_files:
            states = [_load_weights(p / rel) for p in paths]
            for p, state in zip(paths[1:], states[1:]):
                bad = sorted(k for k in states[0].keys() | state.keys()
                             if k not in state or k not in states[0] or state[k].shape != states[0][k].shape)
                if bad:
                    raise CheckpointError(f"cannot average {paths[0]} and {p}: {rel} differs in {bad[:3]}")
            mean = {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) for k, v in states[0].items()}
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(mean, str(tmp / rel))
        for f in paths[0].rglob("*"):  # the rest, e.g. lora/adapter_config.json; never the trainer state
            rel = f.relative_to(paths[0])
            if f.is_file() and f.suffix != ".safetensors" and rel.name not in ("config.json", TRAINER_STATE) \
                    and rel != PEFT_CARD:  # left by checkpoints saved before the card was dropped
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel)
        sources = [{"path": str(p), "digest": c.get("train", {}).get("digest"), "step": c.get("train", {}).get("step"),
                    "config": c.get("train", {}).get("config")} for p, c in zip(paths, configs)]
        key = json.dumps([(s["digest"], s["step"]) for s in sources])
        train = {"digest": hashlib.sha256(key.encode()).hexdigest()[:16], "step": max(s["step"] or 0 for s in sources),
                 "average_of": sources}
        config = {**configs[0], "train": train}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"not a checkpoint: {path} has no config.json")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e.msg}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a llasm checkpoint (format {config.get('format')!r}, expected {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {config.get('version')} is not supported (expected {VERSION})")
    return config


def load_checkpoint(path, merge_lora: bool = False, trainable: bool = False):
    """-> (LLaSMModel, tokenizer, config dict). The base models come from config['base'].

    trainable: LoRA weights stay trainable (resuming a run)."""
    path = Path(path)
    config = read_config(path)
    cfg = LLaSMConfig.from_dict(config["model"])
    encoder = load_whisper(config["base"]["whisper"])
    llm, tokenizer = load_llm(config["base"]["llm"])
    if llm.config.model_type != cfg.llm_arch:
        raise CheckpointError(f"checkpoint was trained on a {cfg.llm_arch} LLM, base is {llm.config.model_type}")
    if encoder.cfg != cfg.encoder:
        raise CheckpointError(f"checkpoint's encoder config {cfg.encoder} differs from the base's {encoder.cfg}")
    mode = config.get("llm_mode", "frozen")
    if mode == "full":
        llm.load_state_dict(_load_weights(path / "llm.safetensors"), strict=False)
    elif mode == "lora":
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads a property transformers has deprecated; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            try:
                llm = PeftModel.from_pretrained(llm, str(path / "lora"), is_trainable=trainable)
            except Exception:
                _load_weights(path / "lora" / "adapter_model.safetensors")  # a damaged file: one line naming it
                raise
        if merge_lora:
            llm = llm.merge_and_unload()
    decoder = queries = None
    if cfg.adaptor.kind == "llasm-query":
        decoder, queries = load_whisper_decoder(config["base"]["whisper"], cfg.adaptor.n_queries)
    model = LLaSMModel(cfg, encoder, llm, decoder, queries)
    state = _load_weights(path / "adaptor.safetensors")
    want = saved_state(model.adaptor).keys()
    if state.keys() != want:
        raise CheckpointError(f"adaptor weights in {path} do not fit the config: missing {sorted(want - state.keys())}"
                              f", unexpected {sorted(state.keys() - want)}")
    try:
        model.adaptor.load_state_dict(state, strict=False)  # a frozen decoder is not in the file: keys checked above
    except RuntimeError as e:
        raise CheckpointError(f"adaptor weights in {path} do not fit the config: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer, config
