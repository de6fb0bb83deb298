"""Pretrained parts from local files only (no hub): Whisper encoder and decoder, causal LM + tokenizer, prompt
format."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.prompt import PromptFormat
from . import packaged
from .ct2 import load_ct2_whisper_decoder, load_ct2_whisper_encoder
from .whisper import WhisperDecoder, WhisperEncoder, load_hf_whisper_decoder, load_whisper_encoder

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class BaseModelError(ValueError):
    pass


def _local_path(spec: str) -> Path:
    """A path spec as is; `package:NAME` resolved to the weights a package ships."""
    if packaged.is_package_spec(spec):
        try:
            return packaged.resolve(spec)
        except ValueError as e:
            raise BaseModelError(str(e)) from e
    return Path(spec)


def load_whisper(spec: str) -> WhisperEncoder:
    """A frozen Whisper encoder from a CTranslate2 model (directory with model.bin, or the model.bin itself),
    a transformers Whisper directory, or a `package:` spec (package:whisper-base, package:whisper-tiny.en)."""
    path = _local_path(spec)
    if path.is_file() or (path / "model.bin").is_file():
        return load_ct2_whisper_encoder(path)
    if (path / "config.json").is_file():
        return load_whisper_encoder(path)
    raise BaseModelError(f"no Whisper model at {spec}: expected a CTranslate2 directory or file (model.bin), "
                         "a transformers directory with config.json, or package:whisper-base / "
                         "package:whisper-tiny.en")


def load_whisper_decoder(spec: str, n_queries: int = 64) -> tuple[WhisperDecoder, torch.Tensor]:
    """A frozen Whisper decoder and its query rows (n_queries, d_model), the decoder-start token's embedding per
    position, from the same specs as load_whisper. Only the first n_queries positions are kept, and no token table."""
    path = _local_path(spec)
    try:
        if path.is_file() or (path / "model.bin").is_file():
            return load_ct2_whisper_decoder(path, n_queries)
        if (path / "config.json").is_file():
            return load_hf_whisper_decoder(path, n_queries)
    except ValueError as e:
        raise BaseModelError(f"Whisper decoder from {spec}: {e}") from e
    raise BaseModelError(f"no Whisper model at {spec}: expected a CTranslate2 directory or file (model.bin), "
                         "a transformers directory with config.json, or package:whisper-base / "
                         "package:whisper-tiny.en")


def load_llm(spec: str):
    """(causal LM, tokenizer) from a transformers directory, a GGUF file (dequantized to float) or a `package:`
    spec (package:qwen2.5-0.5b)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _local_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        path = path.parent
    elif (path / "config.json").is_file():
        kw = {}
    else:
        raise BaseModelError(f"no LLM at {spec}: expected a transformers directory, a .gguf file or "
                             "package:qwen2.5-0.5b")
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
