"""Whether llama.cpp may use its extra weight buffer types on this CPU, decided once and remembered.

llama.cpp built natively on a CPU that advertises AMX (amx_tile, amx_int8) repacks weights for AMX and runs them
with AMX instructions. Some virtual machines advertise AMX yet fault on its first instruction (SIGILL, or SIGSEGV
inside ggml_backend_amx_mul_mat), although the kernel grants the tile state. Loading with
`llama_model_params.use_extra_bufts = False` avoids it, at a price in prefill (BENCHMARKS.md): that also turns off
the repacked AVX2/AVX-512 layouts.

    LLASM_EXTRA_BUFTS=auto   (default) use them, unless this CPU advertises AMX, the llama.cpp build has AMX kernels,
                             and a child process that loads the model with them dies of a signal
    LLASM_EXTRA_BUFTS=on     always use them (a CPU that faults then kills the process)
    LLASM_EXTRA_BUFTS=off    never use them

A verdict is kept in $XDG_CACHE_HOME/llasm/cpu-check.json: a fault stands for this CPU and llama.cpp build, a pass
for that model file only (a model with no AMX-able weights passes without proving anything about the next).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "LLASM_EXTRA_BUFTS"
CHOICES = ("auto", "on", "off")
KEEP_PASSED = 32  # model files remembered as passing, newest last
PROBE_TIMEOUT_S = 300  # a model load and two decodes; a hang is taken as no verdict


@dataclass(frozen=True)
class Verdict:
    extra_bufts: bool
    why: str  # one line: how the choice was made
    checked_now: bool = False  # this call ran the child process (a cached verdict is news no more)


def choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}")
    return value


def _cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ('', set()) where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if not line.strip() and name:
            break
    return name, flags


def _build_has_amx(llama_cpp) -> bool:
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" in info


def _build_id(llama_cpp) -> str:
    """llama-cpp-python's version and the size and time of its CPU backend library: a rebuild is a new build."""
    lib = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted({p.resolve() for p in lib.glob("libggml-cpu*") if p.is_file()}) if lib.is_dir() else []
    stamp = [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in libs]
    return f"{getattr(llama_cpp, '__version__', '?')}|{'|'.join(stamp)}"


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llasm" / "cpu-check.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the check runs again next time
        log.debug("cannot keep the CPU check in %s: %s", path, e)


def probe_command(model: Path) -> list[str]:
    return [sys.executable, "-m", "llasm.runtime.cpu_check", str(model)]


def _probe(model: Path) -> int | None:
    """Load the model with extra buffer types in a child process and decode a batch and a token: the signal number
    when it died of one, else None (it answered, or failed otherwise: no verdict, the load itself will say why)."""
    cmd = probe_command(model)
    try:
        run = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, env=os.environ | {ENV: "on"})
    except subprocess.TimeoutExpired:
        log.info("the CPU check of llama.cpp's extra buffer types timed out after %d s", PROBE_TIMEOUT_S)
        return None
    if run.returncode < 0:
        return -run.returncode
    if run.returncode in (128 + signal.SIGILL, 128 + signal.SIGSEGV, 128 + signal.SIGBUS):  # through a shell
        return run.returncode - 128
    if run.returncode != 0:
        log.debug("the CPU check could not run: %s", run.stderr.decode("utf-8", "replace").strip()[-500:])
    return None


def extra_bufts(model, n_gpu_layers: int = 0) -> Verdict:
    """Whether to load `model` (a GGUF path) with llama.cpp's extra buffer types; see the module docstring."""
    import llama_cpp

    how = choice()
    if how != "auto":
        return Verdict(how == "on", f"{ENV}={how}")
    name, flags = _cpu_flags()
    if "amx_tile" not in flags or not _build_has_amx(llama_cpp):
        return Verdict(True, "no AMX on this CPU or in this llama.cpp build")
    key = hashlib.sha1(f"{name}|{' '.join(sorted(flags))}|{_build_id(llama_cpp)}".encode()).hexdigest()[:16]
    cache = _read_cache()
    entry = cache.get(key, {})
    model = Path(model)
    if entry.get("faults"):
        return Verdict(False, f"this CPU faults in llama.cpp's AMX kernels (checked once, {cache_path()})")
    if _file_id(model) in entry.get("passed", []):
        return Verdict(True, "checked: this model runs with AMX on this CPU")
    log.info("checking once whether llama.cpp's AMX kernels run on this CPU (%s)", name or "unknown CPU")
    sig = _probe(model)
    cache = _read_cache()  # another process may have written meanwhile
    entry = cache.setdefault(key, {"cpu": name, "build": _build_id(llama_cpp)})
    if sig is not None:
        entry["faults"] = True
        entry["signal"] = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else sig
        _write_cache(cache)
        return Verdict(False, f"this CPU advertises AMX but llama.cpp's AMX kernels die of {entry['signal']} here",
                       checked_now=True)
    entry["passed"] = [p for p in entry.get("passed", []) if p != _file_id(model)][-(KEEP_PASSED - 1):] + [
        _file_id(model)]
    _write_cache(cache)
    return Verdict(True, "checked: this model runs with AMX on this CPU", checked_now=True)


def _child(model: str) -> None:
    """The probe: the model loaded with extra buffer types, a batch of 32 tokens and one more decoded."""
    from .llm import LLM

    llm = LLM(model, n_ctx=256, n_batch=64, extra_bufts=True)
    llm.eval_tokens([(i * 37 + 11) % max(llm.n_vocab - 1, 1) for i in range(32)])
    llm.eval_tokens([1])
    llm.close()
    print("ok")


if __name__ == "__main__":
    _child(sys.argv[1])
