"""Audio -> LLM embedding rows with onnxruntime: numpy log-mel per 30 s chunk, one graph run per chunk; and the rows
of recently encoded clips, kept by content."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict

import numpy as np

from .audio import AudioGeometry
from .features import log_mel

log = logging.getLogger(__name__)


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu is installed and sees a GPU, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class AudioEncoder:
    def __init__(self, path, geometry: AudioGeometry, n_threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if n_threads:
            opts.intra_op_num_threads = n_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's workers spin after a run by default; here llama.cpp's prefill comes next on the same cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers())
        self.geometry = geometry
        inp = self.session.get_inputs()[0]
        if inp.shape[1] != geometry.n_mels:
            raise ValueError(f"audio encoder takes {inp.shape[1]} mel bins, manifest says {geometry.n_mels}")
        self.n_embd = int(self.session.get_outputs()[0].shape[1])

    def features(self, samples: np.ndarray) -> list[np.ndarray]:
        """Per chunk: (1, n_mels, n_frames) float32."""
        return [log_mel(samples[s:e], self.geometry.n_mels)[None] for s, e in self.geometry.chunks(samples.size)]

    def encode(self, mels: list[np.ndarray]) -> np.ndarray:
        """-> (rows, n_embd) float32, C-contiguous, chunks concatenated."""
        rows = [self.session.run(None, {"mel": m})[0] for m in mels]
        return np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)

    def encode_heard(self, mels: list[np.ndarray]) -> tuple[np.ndarray, None]:
        """As encode; this adaptor hears no words (whisper-decoder's HeardEncoder returns what Whisper heard)."""
        return self.encode(mels), None

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return self.encode(self.features(samples))


class KeptRows:
    """The rows (and what was heard) of the last `size` clips encoded, by a digest of their samples: a clip given
    again (a server's clients send the whole conversation with every request) is not encoded again. Thread-safe;
    the kept arrays are read-only."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"KeptRows keeps at least 1 clip, got size {size}")
        self.size = size
        self._items: OrderedDict = OrderedDict()  # digest -> (rows, heard text or None), oldest first
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(samples: np.ndarray) -> bytes:
        """The digest of a clip's float32 samples."""
        return hashlib.blake2b(np.ascontiguousarray(samples, dtype=np.float32), digest_size=16).digest()

    def get(self, key: bytes):
        """(rows, heard) kept for the clip, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item

    def put(self, key: bytes, rows: np.ndarray, heard: str | None) -> None:
        rows.setflags(write=False)  # shared by every conversation that holds the clip
        with self._lock:
            self._items[key] = (rows, heard)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
