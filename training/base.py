"""Pretrained parts from local files only (no hub): Whisper encoder, causal LM + tokenizer, prompt format."""
from __future__ import annotations

import logging
from pathlib import Path

from ..runtime.prompt import PromptFormat
from .whisper import WhisperEncoder, load_whisper_encoder

log = logging.getLogger(__name__)


class BaseModelError(ValueError):
    pass


def load_whisper(spec: str) -> WhisperEncoder:
    """A frozen Whisper encoder from a transformers Whisper directory."""
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"no Whisper model at {spec}: expected a transformers directory with config.json")
    return load_whisper_encoder(path)


def load_llm(spec: str):
    """(causal LM, tokenizer) from a transformers directory or a GGUF file (dequantized to float)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        path = path.parent
    elif (path / "config.json").is_file():
        kw = {}
    else:
        raise BaseModelError(f"no LLM at {spec}: expected a transformers directory or a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    return model, tokenizer


def prompt_format(tokenizer) -> PromptFormat:
    """The conversation format read from the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise BaseModelError("the LLM's tokenizer has no chat template; an instruction-tuned LLM is needed")

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return PromptFormat.from_chat_template(render, bos=tokenizer.bos_token or "")
