"""Training data: JSONL manifests -> conversations -> padded batches with assistant-only labels.

ASR row:          {"audio": "clips/a.wav", "text": "the transcript"}
Conversation row: {"turns": [{"role": "user", "content": [{"audio": "q.wav"}, {"text": "Answer briefly."}]},
                             {"role": "assistant", "content": "Paris."}]}
Audio paths are relative to the manifest. A `content` is a string or a list of {"text"} / {"audio"} parts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.audio import AudioGeometry, load_audio
from ..runtime.prompt import PromptFormat, Turn, transcribe_turns
from .features import log_mel
from .model import IGNORE, Batch

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    turns: tuple  # of Turn; audio parts are Paths
    asr: bool = False  # an ASR row: one clip, and its transcript as the answer


def _parse_turn(turn: dict, root: Path, where: str) -> Turn:
    content = turn.get("content")
    if isinstance(content, str):
        parts = (content,)
    elif isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and "text" in p:
                parts.append(str(p["text"]))
            elif isinstance(p, dict) and "audio" in p:
                parts.append(root / p["audio"])
            else:
                raise ManifestError(f"{where}: a content part must be {{'text': ...}} or {{'audio': ...}}, got {p!r}")
    else:
        raise ManifestError(f"{where}: turn content must be a string or a list of parts, got {type(content).__name__}")
    try:
        return Turn(turn.get("role", ""), tuple(parts))
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None


def read_manifest(path, transcribe_instruction: str) -> list[Example]:
    """Rows of a JSONL manifest as examples; ASR rows become the fixed transcribe conversation."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root, out = path.parent, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not JSON ({e.msg})") from None
        if "turns" in row:
            turns = tuple(_parse_turn(t, root, where) for t in row["turns"])
        elif "audio" in row and "text" in row:
            turns = tuple(transcribe_turns(root / row["audio"], transcribe_instruction)) + (
                Turn("assistant", (str(row["text"]),)),)
        else:
            raise ManifestError(f"{where}: a row needs 'turns', or 'audio' and 'text'")
        if not any(t.role == "assistant" for t in turns):
            raise ManifestError(f"{where}: a training conversation needs an assistant turn")
        out.append(Example(turns, asr="turns" not in row))
    if not out:
        raise ManifestError(f"manifest {path} has no rows")
    return out


class Collator:
    """Examples -> Batch: renders with the prompt format, tokenizes text, computes log-mel per 30 s chunk."""

    def __init__(self, tokenizer, prompt: PromptFormat, geometry: AudioGeometry):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.geometry = geometry

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, examples: list[Example]) -> Batch:
        mels, items, keys = [], [], []
        for ex in examples:
            pieces = []
            for seg in self.prompt.render(ex.turns, add_generation_prompt=False):
                if seg.is_audio:
                    samples = torch.from_numpy(load_audio(seg.audio))
                    chunk_ids = []
                    for s, e in self.geometry.chunks(samples.numel()):
                        chunk_ids.append(len(mels))
                        keys.append(f"{seg.audio}#{s}" if isinstance(seg.audio, (str, Path)) else None)
                        mels.append(log_mel(samples[s:e], self.geometry.n_mels))
                    pieces.append(("audio", chunk_ids))
                else:
                    ids = torch.tensor(self.tokens(seg.text), dtype=torch.long)
                    labels = ids.clone() if seg.labelled else torch.full_like(ids, IGNORE)
                    pieces.append(("text", ids, labels))
            items.append(pieces)
        n_frames = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
        T = int(n_frames.max()) if mels else 0
        mel = torch.zeros(len(mels), self.geometry.n_mels, T)
        for i, m in enumerate(mels):
            mel[i, :, : m.shape[1]] = m
        return Batch(mel=mel, n_frames=n_frames, items=items, keys=keys)
