"""What every command shares: logging setup and mapping known errors to one line and an exit code."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager


# libraries whose INFO messages are their own bookkeeping, not progress a user follows (shown with -v)
CHATTY = ("gguf",)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else max(level, logging.WARNING))


def known_errors() -> tuple:
    from ..runtime.audio import AudioError
    from ..runtime.bundle import BundleError
    from ..runtime.llm import LLMError

    return (AudioError, BundleError, LLMError, ValueError, OSError, RuntimeError)


@contextmanager
def one_line_errors(prog: str):
    """Known errors end the command with 'prog: error: ...' and exit code 1, never a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except known_errors() as e:
        fail(prog, e)


def fail(prog: str, e: BaseException, code: int = 1):
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def default_bundle():
    """The default bundle's directory, built on first use (showing its progress: it takes a minute)."""
    from ..export.default import ensure_default_bundle

    llasm_log = logging.getLogger("llasm")
    level = llasm_log.level
    llasm_log.setLevel(logging.INFO)
    try:
        return ensure_default_bundle()
    finally:
        llasm_log.setLevel(level)
