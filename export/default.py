"""The default bundle: built once, on first use, from the packaged base weights + the release in export/release/default.

A release is one of:
    llasm-release      config.json naming the adaptor's settings and the `package:` bases (a whisper-decoder
                       adaptor, plus row_map.npz when it learned one, and whisper_lora.npz when Whisper's decoder
                       learned the training voices): built with numpy, onnx and gguf (no torch)
    llasm-checkpoint   a training checkpoint (config, adaptor and LoRA weights): exported with torch
Nothing is downloaded from a hub. A bundle built from the release records the release's digest, and is built again
when an llasm update ships a different release.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from ..runtime.bundle import BundleError, read_bundle
from ..runtime.chat import default_bundle_path

log = logging.getLogger(__name__)

RELEASE_NAME = "default"  # the mark a bundle built from the shipped release carries in its provenance
RELEASE = Path(__file__).resolve().parent / "release" / RELEASE_NAME
SAMPLES = Path(__file__).resolve().parent.parent / "runtime" / "samples"
# fp32: dynamic int8 of the stack-mlp encoder alone left its rows at cosine 0.92 to torch on speech (export refuses
# < 0.99; BENCHMARKS.md), and fp16 is slow on most CPUs
ONNX_PRECISION = "fp32"
# what building each kind of release imports (the torch path traces the encoder and loads the bases with transformers)
NEEDS = {"llasm-release": ("onnx",), "llasm-checkpoint": ("torch", "onnx", "transformers", "peft")}
HINTS = {"llasm-release": "pip install 'llasm[base]'",
         "llasm-checkpoint": "pip install torch==2.13.0 && pip install 'llasm[export,base]'"}


def release_digest(root: Path = None) -> str:
    """sha256 over the release's files (names and bytes), 16 hex digits."""
    root = Path(root or RELEASE)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def release_format(root: Path = None) -> str:
    root = Path(root or RELEASE)
    try:
        fmt = json.loads((root / "config.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError) as e:
        raise BundleError(f"the release in {root} cannot be read: {e}") from None
    if fmt not in NEEDS:
        raise BundleError(f"the release in {root} has format {fmt!r}, expected one of {sorted(NEEDS)}")
    return fmt


def stale_release(path: Path) -> bool:
    """Whether the bundle at path was built from another release than the one this llasm ships (torch-free). A
    bundle of the user's own ($LLASM_BUNDLE) has no release mark and is never stale."""
    try:
        provenance = read_bundle(path, verify=False).manifest.get("provenance", {})
    except BundleError:
        return False
    if provenance.get("release") != RELEASE_NAME or not (RELEASE / "config.json").is_file():
        return False
    return provenance.get("release_digest") != release_digest()


def ensure_default_bundle(rebuild: bool = False) -> Path:
    """The bundle that `LLaSM.load()` and `llasm-local` use when none is named: the default bundle's directory, built
    first if it is missing, broken or from another release. Without what the build needs, a bundle from an earlier
    release is used as it is. A bundle of the user's own at $LLASM_BUNDLE is never stale. Importing this module
    loads no torch."""
    out = default_bundle_path()
    stale, why = False, None
    if out.is_dir() and not rebuild:
        try:
            read_bundle(out, verify=False)
            if not stale_release(out):
                return out
            stale, why = True, "this llasm ships another release"
        except BundleError as e:
            why = str(e)
    if not (RELEASE / "config.json").is_file():
        raise BundleError("no default model ships with this llasm yet: name a bundle directory (llasm-export builds "
                          "one)")
    fmt = release_format()
    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        if stale:
            log.warning("the default bundle is from an earlier release; rebuilding it needs %s (%s is missing)",
                        HINTS[fmt], missing[0])
            return out
        raise BundleError(f"the default bundle is built on first use and that needs {missing[0]}: {HINTS[fmt]}")
    if why:
        log.warning("rebuilding the default bundle: %s", why)
    log.info("building the default bundle once into %s (a minute or two)", out)
    if fmt == "llasm-release":
        build_release(RELEASE, out, overwrite=True, name=RELEASE_NAME)
    else:
        from .bundle import export_bundle

        export_bundle(RELEASE, out, onnx_precision=ONNX_PRECISION, gguf_type="auto", overwrite=True,
                      release=RELEASE_NAME, release_digest=release_digest())
    return out


def _local_path(spec: str) -> Path:
    from ..training import packaged  # torch-free (training/base.py is not)

    return packaged.resolve(spec) if packaged.is_package_spec(spec) else Path(spec)


def build_release(release, out, overwrite: bool = False, precision: str | None = None, name: str | None = None):
    """A bundle from an llasm-release directory (its config.json, row_map.npz and whisper_lora.npz if any),
    torch-free; name: the release mark its provenance carries (the shipped one's is RELEASE_NAME). -> the builder's
    report."""
    from .whisper_bundle import build_whisper_bundle

    release = Path(release)
    if release_format(release) != "llasm-release":
        raise ValueError(f"{release} is a training checkpoint, not an llasm-release")
    cfg = json.loads((release / "config.json").read_text(encoding="utf-8"))
    try:
        probe, row_map, whisper_lora = cfg.get("probe") or {}, release / "row_map.npz", release / "whisper_lora.npz"
        return build_whisper_bundle(_local_path(cfg["base"]["whisper"]), _local_path(cfg["base"]["llm"]), out,
                                    adaptor=cfg["adaptor"], row_map=row_map if row_map.is_file() else None,
                                    whisper_lora=whisper_lora if whisper_lora.is_file() else None,
                                    int8_probes=[q for lang in cfg["adaptor"].get("tuned", ())
                                                 if (q := SAMPLES / f"question_{lang}.wav").is_file()],
                                    provenance={"base": cfg["base"], "release": name,
                                                "release_digest": release_digest(release)},
                                    probe=SAMPLES / probe["audio"] if probe.get("audio") else None,
                                    expect=probe.get("expect"), precision=precision or cfg.get("precision", "int8"),
                                    overwrite=overwrite)
    except KeyError as e:
        raise ValueError(f"{release / 'config.json'} lacks {e.args[0]!r}") from None
