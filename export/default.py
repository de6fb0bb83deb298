"""The default bundle: built once, on first use, from the packaged base weights + the release checkpoint.

The release checkpoint (export/release/default: config, adaptor and LoRA weights, 35 MB) is the one trained binary
in the repository; its config names its bases as `package:` specs, so nothing is downloaded from a hub.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..runtime.bundle import BundleError, read_bundle
from ..runtime.chat import default_bundle_path

log = logging.getLogger(__name__)

RELEASE_NAME = "default"  # the mark a bundle built from the shipped release carries in its provenance
RELEASE = Path(__file__).resolve().parent / "release" / RELEASE_NAME
# fp32: dynamic int8 of the encoder alone left the release adaptor's rows at cosine 0.92 to torch on speech (export
# refuses < 0.99; BENCHMARKS.md), and fp16 is slow on most CPUs
ONNX_PRECISION = "fp32"


def stale_release(path: Path) -> bool:
    """Whether the bundle at path was built from an earlier release checkpoint than the one this llasm ships
    (torch-free). A bundle of the user's own ($LLASM_BUNDLE) has no release mark and is never stale."""
    import json

    try:
        provenance = read_bundle(path, verify=False).manifest.get("provenance", {})
        train = json.loads((RELEASE / "config.json").read_text(encoding="utf-8"))["train"]
    except (BundleError, OSError, ValueError, KeyError):
        return False
    return provenance.get("release") == RELEASE_NAME and (
        provenance.get("train_digest"), provenance.get("train_step")) != (train["digest"], train["step"])


def ensure_default_bundle(rebuild: bool = False) -> Path:
    """The bundle that `LLaSM.load()` and `llasm-local` use when none is named: the default bundle's directory, built
    first if it is missing, broken or from an earlier release. Building needs the export and base extras; without
    them a bundle from an earlier release is used as it is. A bundle of the user's own at $LLASM_BUNDLE is never
    stale. Importing this module loads no torch: only a build does."""
    out = default_bundle_path()
    stale, why = False, None
    if out.is_dir() and not rebuild:
        try:
            read_bundle(out, verify=False)
            if not stale_release(out):
                return out
            stale, why = True, "this llasm ships a newer release checkpoint"
        except BundleError as e:
            why = str(e)
    if not (RELEASE / "config.json").is_file():
        raise BundleError("no default model ships with this llasm yet: name a bundle directory (llasm-export builds "
                          "one)")
    missing = [m for m in ("torch", "onnx", "transformers") if importlib.util.find_spec(m) is None]
    if missing:  # the build traces the encoder with torch and loads the bases with transformers
        if stale:
            log.warning("the default bundle is from an earlier release; rebuilding it needs 'llasm[export,base]' "
                        "(%s is missing)", missing[0])
            return out
        raise BundleError(f"the default bundle is built on first use and that needs {missing[0]}: "
                          "pip install torch==2.13.0 && pip install 'llasm[export,base]'")
    if why:
        log.warning("rebuilding the default bundle: %s", why)
    from .bundle import export_bundle

    log.info("building the default bundle once into %s (a few minutes)", out)
    export_bundle(RELEASE, out, onnx_precision=ONNX_PRECISION, gguf_type="auto", overwrite=True,
                  release=RELEASE_NAME)
    return out
