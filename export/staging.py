"""What every bundle builder shares: a bundle is written into a temporary directory beside its destination and moved
into place only once it is complete and checked, so a reader never sees half a bundle; and the probe clip that checks
an exported graph when no speech is at hand."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..runtime import bundle as B


@contextmanager
def staged_bundle(out, overwrite: bool = False):
    """Yields a temporary directory; on a clean exit it must hold a bundle that reads back (manifest included), and
    it replaces `out`; on an error it is removed and `out` is left as it was."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is an ordinary readable directory
    try:
        yield tmp
        B.read_bundle(tmp)  # the manifest describes what is there
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def probe_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced test signal: harmonics of a wandering pitch with syllable-like loudness and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(130 + 25 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 6))) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.5 * t))
    return (0.2 * voiced + 0.005 * rng.standard_normal(t.size)).astype(np.float32)
