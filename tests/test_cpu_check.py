"""Whether llama.cpp may use extra buffer types (cpu_check): the override, the cached verdicts, the child probe's
reading of a death by signal, and the one-line note when the runtime falls back. No real fault is needed."""
import logging
import signal
import sys

import pytest

import tiny
from llasm.runtime import cpu_check
from llasm.runtime.cpu_check import ENV, Verdict

pytest.importorskip("llama_cpp")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV, raising=False)
    return tmp_path / "cache" / "llasm" / "cpu-check.json"


@pytest.fixture
def amx_machine(monkeypatch):
    """A CPU that advertises AMX and a llama.cpp build with AMX kernels, whatever this machine is."""
    monkeypatch.setattr(cpu_check, "_cpu_flags", lambda: ("Test CPU", {"avx2", "amx_tile", "amx_int8"}))
    monkeypatch.setattr(cpu_check, "_build_has_amx", lambda llama_cpp: True)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF not loaded: the probe is replaced")
    return path


def probes(monkeypatch, outcome):
    """Replace the child process: outcome is the signal it dies of, or None; returns the list of probed models."""
    calls = []

    def fake(model):
        calls.append(model)
        return outcome

    monkeypatch.setattr(cpu_check, "_probe", fake)
    return calls


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False), ("ON", True)])
def test_the_environment_overrides_without_a_probe(cache, amx_machine, model, monkeypatch, value, expected):
    calls = probes(monkeypatch, signal.SIGILL)
    monkeypatch.setenv(ENV, value)
    verdict = cpu_check.extra_bufts(model)
    assert verdict.extra_bufts is expected and ENV in verdict.why and not calls


def test_a_bad_override_is_refused(cache, model, monkeypatch):
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="LLASM_EXTRA_BUFTS must be one of auto, on, off, got 'maybe'"):
        cpu_check.extra_bufts(model)


def test_no_amx_advertised_means_no_probe(cache, model, monkeypatch):
    monkeypatch.setattr(cpu_check, "_cpu_flags", lambda: ("EPYC", {"avx2", "fma"}))
    calls = probes(monkeypatch, signal.SIGILL)
    assert cpu_check.extra_bufts(model).extra_bufts and not calls and not cache.exists()


def test_a_fault_is_remembered_for_every_model(cache, amx_machine, model, tmp_path, monkeypatch):
    calls = probes(monkeypatch, signal.SIGSEGV)
    first = cpu_check.extra_bufts(model)
    assert (first.extra_bufts, first.checked_now) == (False, True) and "SIGSEGV" in first.why
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    again = cpu_check.extra_bufts(other)
    assert (again.extra_bufts, again.checked_now) == (False, False) and len(calls) == 1 and cache.is_file()


def test_a_pass_is_remembered_for_that_model_only(cache, amx_machine, model, tmp_path, monkeypatch):
    calls = probes(monkeypatch, None)
    assert cpu_check.extra_bufts(model) == Verdict(True, "checked: this model runs with AMX on this CPU", True)
    assert cpu_check.extra_bufts(model).checked_now is False and len(calls) == 1
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model, maybe with AMX-able weights")
    assert cpu_check.extra_bufts(other).extra_bufts and len(calls) == 2


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV])
def test_the_probe_reads_a_death_by_signal(model, monkeypatch, sig):
    code = f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"
    monkeypatch.setattr(cpu_check, "probe_command", lambda m: [sys.executable, "-c", code])
    assert cpu_check._probe(model) == sig


def test_the_probe_gives_no_verdict_for_other_failures(model, monkeypatch):
    monkeypatch.setattr(cpu_check, "probe_command", lambda m: [sys.executable, "-c", "raise SystemExit(3)"])
    assert cpu_check._probe(model) is None


def test_the_real_probe_answers_on_a_tiny_model(tmp_path):
    """The child process loads a model with extra buffer types and decodes; an f32 model has no AMX-able weights,
    so it answers on every CPU."""
    torch = pytest.importorskip("torch")
    from llasm.export.gguf import write_gguf

    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny.lm("qwen2", 384), tiny.tokenizer(), path, dtype="f32")
    assert cpu_check._probe(path) is None


def test_the_fallback_is_said_once_as_a_warning_when_found(tmp_path, monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    from llasm.export.gguf import write_gguf
    from llasm.runtime import llm as llm_module

    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny.lm("qwen2", 384), tiny.tokenizer(), path, dtype="f32")
    monkeypatch.setattr(llm_module, "_said", set())
    found = Verdict(False, "a test fault", checked_now=True)
    monkeypatch.setattr(cpu_check, "extra_bufts", lambda model, n_gpu_layers=0: found)
    with caplog.at_level(logging.INFO, logger="llasm.runtime.llm"):
        for _ in range(2):
            model = llm_module.LLM(path, n_ctx=64, n_batch=16)
            assert model.extra_bufts is False
            model.eval_tokens([1, 2, 3])
            model.close()
    notes = [r for r in caplog.records if r.getMessage().startswith(llm_module.FALLBACK_NOTE)]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING and "a test fault" in notes[0].getMessage()
