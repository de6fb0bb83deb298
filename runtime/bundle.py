"""The bundle: what ships to a laptop. A directory with a versioned manifest that describes every file.

    manifest.json       format, version, adaptor, audio geometry, prompt format, n_embd, files (sha256, size),
                        provenance
    llm.gguf            the LLM for llama.cpp
    llm.lora.gguf       (optional) a LoRA adapter llama.cpp applies on top of llm.gguf
  adaptor "stack-mlp" or "llasm-query" (version 1 bundles are these):
    audio_encoder.onnx  log-mel (1, n_mels, T) -> embedding rows (R, n_embd)
  adaptor "whisper-decoder" (version 2):
    audio_encoder.onnx  Whisper's encoder: log-mel -> the decoder's cross-attention keys and values
    text_decoder.onnx   Whisper's decoder step with a KV cache -> logits and state of the next token
    whisper_tokens.json Whisper's vocabulary (byte-level BPE strings) and suppress lists
    row_map.npz         (optional) a learned map from decoder states to rows: weight (n_embd, d), bias (n_embd,)
  manifest["adaptor"]: {"kind", and for whisper-decoder: "rows" (soft|hard), "languages", "pad_seconds", "begin",
  "end"}
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .audio import AudioGeometry
from .prompt import TRANSCRIBE_INSTRUCTION, PromptFormat

FORMAT = "llasm-bundle"
VERSION = 2
READS = (1, 2)  # manifest versions this llasm reads
MANIFEST = "manifest.json"
AUDIO_ENCODER = "audio_encoder"  # keys of manifest["files"]
LLM = "llm"
LLM_LORA = "llm_lora"  # optional: a GGUF LoRA adapter applied on top of llm
TEXT_DECODER = "text_decoder"  # whisper-decoder
WHISPER_TOKENS = "whisper_tokens"  # whisper-decoder
ROW_MAP = "row_map"  # whisper-decoder, optional
ADAPTOR_KINDS = ("stack-mlp", "llasm-query", "whisper-decoder")
NEEDS = {"whisper-decoder": (TEXT_DECODER, WHISPER_TOKENS)}  # files a kind needs besides the encoder and the LLM
OPTIONAL = (LLM_LORA, ROW_MAP)


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
    transcribe_system: str | None = None  # the transcription prompt's system text (None: the default one)
    transcribe_examples: tuple = ()  # (user, assistant) exchanges the transcription prompt starts from

    @property
    def adaptor(self) -> dict:
        """The adaptor's settings; "kind" at least (a version 1 bundle's is stack-mlp or llasm-query)."""
        return self.manifest.get("adaptor") or {"kind": "llasm-query" if self.geometry.fixed_rows else "stack-mlp"}

    def file(self, key: str) -> Path:
        return self.path / self.manifest["files"][key]["path"]

    def optional(self, key: str) -> Path | None:
        return self.file(key) if key in self.manifest["files"] else None

    @property
    def audio_encoder(self) -> Path:
        return self.file(AUDIO_ENCODER)

    @property
    def llm(self) -> Path:
        return self.file(LLM)

    @property
    def llm_lora(self) -> Path | None:
        return self.optional(LLM_LORA)


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
    if manifest.get("version") not in READS:
        raise BundleError(f"bundle format version {manifest.get('version')} is not supported (this llasm reads "
                          f"{', '.join(map(str, READS))}: a newer llasm wrote it?)")
    try:
        geometry = AudioGeometry.from_dict(manifest["geometry"])
        prompt = PromptFormat.from_dict(manifest["prompt"])
        n_embd = int(manifest["n_embd"])
        files = manifest["files"]
        kind = (manifest.get("adaptor") or {}).get("kind", "llasm-query" if geometry.fixed_rows else "stack-mlp")
        if kind not in ADAPTOR_KINDS:
            raise ValueError(f"adaptor kind {kind!r} is not one of {ADAPTOR_KINDS}")
        needed = (AUDIO_ENCODER, LLM) + NEEDS.get(kind, ())
        entries = [files[k] for k in needed] + [files[k] for k in OPTIONAL if k in files]
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
    try:
        examples = tuple((str(u), str(a)) for u, a in manifest.get("transcribe_examples", ()))
    except (TypeError, ValueError):
        raise BundleError(f"{mf}: transcribe_examples must be a list of [user, assistant] pairs") from None
    return Bundle(path, manifest, geometry, prompt, n_embd,
                  manifest.get("transcribe_instruction", TRANSCRIBE_INSTRUCTION), manifest.get("transcribe_system"),
                  examples)
