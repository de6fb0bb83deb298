"""The bundle: what ships to a laptop. A directory with a versioned manifest that describes every file.

    manifest.json       format, version, audio geometry, prompt format, n_embd, files (sha256, size), provenance
    audio_encoder.onnx  log-mel (1, n_mels, T) -> embedding rows (R, n_embd)
    llm.gguf            the LLM for llama.cpp
    llm.lora.gguf       (optional) a LoRA adapter llama.cpp applies on top of llm.gguf
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .audio import AudioGeometry
from .prompt import TRANSCRIBE_INSTRUCTION, PromptFormat

FORMAT = "llasm-bundle"
VERSION = 1
MANIFEST = "manifest.json"
AUDIO_ENCODER = "audio_encoder"  # keys of manifest["files"]
LLM = "llm"
LLM_LORA = "llm_lora"  # optional: a GGUF LoRA adapter applied on top of llm


class BundleError(ValueError):
    """A bundle that cannot be used: missing, malformed, tampered or inconsistent."""


def sha256(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"path": path.name, "sha256": sha256(path), "size": path.stat().st_size}


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    geometry: AudioGeometry
    prompt: PromptFormat
    n_embd: int
    transcribe_instruction: str

    def file(self, key: str) -> Path:
        return self.path / self.manifest["files"][key]["path"]

    @property
    def audio_encoder(self) -> Path:
        return self.file(AUDIO_ENCODER)

    @property
    def llm(self) -> Path:
        return self.file(LLM)

    @property
    def llm_lora(self) -> Path | None:
        return self.file(LLM_LORA) if LLM_LORA in self.manifest["files"] else None


def read_bundle(path, verify: bool = True) -> Bundle:
    """Read and check a bundle; verify=True also checks every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path} is not a directory")
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"not a llasm bundle: {path} has no {MANIFEST}")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mf} is not a llasm bundle manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise BundleError(f"bundle format version {manifest.get('version')} is not supported (expected {VERSION})")
    try:
        geometry = AudioGeometry.from_dict(manifest["geometry"])
        prompt = PromptFormat.from_dict(manifest["prompt"])
        n_embd = int(manifest["n_embd"])
        files = manifest["files"]
        entries = [files[AUDIO_ENCODER], files[LLM]] + ([files[LLM_LORA]] if LLM_LORA in files else [])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mf} is incomplete or malformed: {type(e).__name__} {e}") from None
    for entry in entries:
        f = path / entry["path"]
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if verify:
            size = f.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"bundle file {f.name} has {size} bytes, manifest says {entry['size']}")
            if sha256(f) != entry["sha256"]:
                raise BundleError(f"bundle file {f.name} does not match its sha256 in the manifest (corrupt or tampered)")
    return Bundle(path, manifest, geometry, prompt, n_embd,
                  manifest.get("transcribe_instruction", TRANSCRIBE_INSTRUCTION))
