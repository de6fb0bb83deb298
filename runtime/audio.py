"""Audio geometry and audio input: the one place that says how speech becomes embedding rows.

    samples (16 kHz mono float32)
      -> log-mel frames      one per HOP_LENGTH samples (10 ms)
      -> encoder frames      conv2 has stride 2: one per 20 ms
      -> adaptor rows        rows = "frames": stack_factor encoder frames become one LLM embedding row (stack-mlp)
                             rows = "queries": fixed_rows per encoder pass, whatever its length (llasm-query)
                             rows = "tokens": one per token of Whisper's own transcript (whisper-decoder): how many
                             depends on what was said, not on the length
      + 2 rows               learned begin/end-of-audio embeddings around every audio segment (stack-mlp, llasm-query)

Whisper's encoder has a table of 1500 positions (30 s); longer audio is cut into 30 s chunks.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # Hz
N_FFT = 400  # samples, 25 ms window
HOP_LENGTH = 160  # samples, 10 ms between log-mel frames
ENCODER_STRIDE = 2  # log-mel frames per encoder frame
MAX_ENCODER_POSITIONS = 1500  # encoder frames in Whisper's positional table: 30 s
N_BOUNDARY_ROWS = 2  # begin-of-audio and end-of-audio rows added by the adaptor
ROW_UNITS = ("frames", "queries", "tokens")


@dataclass(frozen=True)
class AudioGeometry:
    """Geometry of one audio encoder + adaptor; stored in checkpoints and bundle manifests."""

    n_mels: int = 80
    stack_factor: int = 8
    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    encoder_stride: int = ENCODER_STRIDE
    max_encoder_positions: int = MAX_ENCODER_POSITIONS
    boundary_rows: int = N_BOUNDARY_ROWS
    fixed_rows: int = 0  # 0: rows grow with the length; > 0: rows per encoder pass, boundaries aside
    rows: str = ""  # "frames", "queries" or "tokens" (see the module docstring); "" reads it from fixed_rows

    def __post_init__(self):
        if self.fixed_rows < 0:
            raise ValueError(f"fixed_rows must be >= 0 (0: rows grow with the length), got {self.fixed_rows}")
        if not self.rows:
            object.__setattr__(self, "rows", "queries" if self.fixed_rows else "frames")
        if self.rows not in ROW_UNITS:
            raise ValueError(f"rows must be one of {ROW_UNITS}, got {self.rows!r}")
        if (self.rows == "queries") != (self.fixed_rows > 0):
            raise ValueError(f"fixed_rows ({self.fixed_rows}) goes with rows 'queries' only, rows is {self.rows!r}")
        if self.n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128 (Whisper's), got {self.n_mels}")
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, got {self.stack_factor}")
        if (self.sample_rate, self.n_fft, self.hop_length, self.encoder_stride) != (
            SAMPLE_RATE, N_FFT, HOP_LENGTH, ENCODER_STRIDE):
            raise ValueError("Whisper geometry is fixed: 16 kHz, n_fft 400, hop 160, stride 2")

    @property
    def max_chunk_samples(self) -> int:
        """Longest audio one encoder pass takes (30 s)."""
        return self.max_encoder_positions * self.encoder_stride * self.hop_length

    @property
    def samples_per_row(self) -> int:
        """Audio samples one adaptor row stands for (2560, 160 ms, at stack 8); rows start on multiples of it."""
        return self.stack_factor * self.encoder_stride * self.hop_length

    def n_frames(self, n_samples: int) -> int:
        """log-mel frames for n_samples (Whisper drops the last STFT frame)."""
        return n_samples // self.hop_length

    def n_encoder_frames(self, n_frames: int) -> int:
        """conv1 (stride 1) then conv2 (kernel 3, stride 2, padding 1)."""
        return (n_frames - 1) // self.encoder_stride + 1

    @property
    def streams(self) -> bool:
        """Each row stands for a stretch of audio, so rows can be computed while the audio comes in."""
        return self.rows == "frames"

    def n_rows_for_frames(self, n_frames: int) -> int:
        """Adaptor output rows for one encoder pass over n_frames log-mel frames."""
        if self.rows == "tokens":
            raise ValueError("rows of Whisper's transcript depend on what was said: they are known after decoding")
        if self.fixed_rows:
            return self.fixed_rows + self.boundary_rows
        return math.ceil(self.n_encoder_frames(n_frames) / self.stack_factor) + self.boundary_rows

    def chunks(self, n_samples: int) -> list[tuple[int, int]]:
        """(start, end) sample ranges of the encoder passes for n_samples of audio."""
        step = self.max_chunk_samples
        return [(s, min(s + step, n_samples)) for s in range(0, max(n_samples, 1), step)]

    def n_embeddings(self, n_samples: int) -> int:
        """LLM embedding rows that n_samples of audio become (all chunks together)."""
        return sum(self.n_rows_for_frames(self.n_frames(e - s)) for s, e in self.chunks(n_samples))

    @property
    def embeddings_per_second(self) -> float:
        """Rows per second of long audio, boundaries aside."""
        if self.rows == "tokens":
            raise ValueError("rows of Whisper's transcript depend on what was said, not on the length")
        if self.fixed_rows:
            return self.fixed_rows * self.sample_rate / self.max_chunk_samples
        return self.sample_rate / (self.hop_length * self.encoder_stride * self.stack_factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioGeometry":
        return cls(**d)


class AudioError(ValueError):
    """Audio that cannot be used: missing, unreadable, empty or silent."""


class NoSpeech(AudioError):
    """Audio with sound in it, where the model heard no words (Whisper's no-speech test)."""


MIN_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: shorter input carries no speech


def _read(file, what: str) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of an audio file (a path or a file object) as soundfile reads it."""
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - soundfile is a core dependency
        raise AudioError("reading audio files needs soundfile: pip install soundfile") from e
    try:
        data, sample_rate = soundfile.read(file, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"cannot read audio from {what}: {(str(e).strip() or type(e).__name__).splitlines()[0]}") \
            from None
    return data.mean(axis=1), sample_rate


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """Return float32 mono samples at 16 kHz from a path, the bytes of an audio file (wav, flac, ogg, mp3: what
    soundfile reads), or an array (with its sample_rate)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{path} is a directory, not an audio file" if path.is_dir() else
                             f"audio file not found: {path}")
        what = str(path)
        samples, sample_rate = _read(what, what)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = f"{len(source)} bytes of audio"
        if not len(source):
            raise AudioError("the audio is empty (0 bytes)")
        samples, sample_rate = _read(io.BytesIO(bytes(source)), what)
    else:
        samples = np.asarray(source)
        if samples.ndim == 2:  # (n, channels) like soundfile
            samples = samples.mean(axis=1)
        if samples.ndim != 1:
            raise AudioError(f"audio array must be 1-D mono or (n, channels), got shape {samples.shape}")
        if not np.issubdtype(samples.dtype, np.floating):
            raise AudioError(f"audio array must be float samples in [-1, 1], got dtype {samples.dtype}")
        sample_rate = SAMPLE_RATE if sample_rate is None else sample_rate
        what = "audio array"
    samples = np.asarray(samples, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate, SAMPLE_RATE)
    if samples.size < MIN_SAMPLES:
        raise AudioError(f"{what} is too short: {samples.size / SAMPLE_RATE:.3f} s, need at least 0.1 s")
    if not np.isfinite(samples).all():
        raise AudioError(f"{what} contains NaN or infinite samples")
    if float(np.max(np.abs(samples))) < 1e-4:
        raise AudioError(f"{what} is silent")
    return samples


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling (windowed sinc), numpy only."""
    if rate_in <= 0:
        raise AudioError(f"sample rate must be positive, got {rate_in}")
    if rate_in == rate_out:
        return samples.astype(np.float32)
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    n_out = int(math.ceil(samples.size * up / down))
    cutoff = min(1.0, up / down)  # relative to the input Nyquist
    half = 16  # filter half-width in input samples (at the lower rate)
    reach = int(math.ceil(half / cutoff))
    taps = np.arange(-reach + 1, reach + 1, dtype=np.int64)  # (K,) integer offsets, each once
    window = np.kaiser(taps.size, 8.0)
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, 16384):  # blocks keep the (n, K) temporaries small
        t = np.arange(start, min(start + 16384, n_out)) * (down / up)  # output times, in input samples
        idx = np.floor(t).astype(np.int64)[:, None] + taps[None, :]  # (n, K)
        w = cutoff * np.sinc(cutoff * (t[:, None] - idx)) * window[None, :]
        valid = (idx >= 0) & (idx < samples.size)
        vals = np.where(valid, samples[np.clip(idx, 0, samples.size - 1)], 0.0)
        out[start:start + t.size] = (vals * w).sum(axis=1)
    return out


class StreamResampler:
    """resample() for audio that arrives in blocks (a microphone): each push returns the output samples that no later
    input can change, equal to those of resample() over all the input so far; flush() returns the rest."""

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE):
        if rate_in <= 0:
            raise AudioError(f"sample rate must be positive, got {rate_in}")
        g = math.gcd(rate_in, rate_out)
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down = rate_out // g, rate_in // g
        self.reach = int(math.ceil(16 / min(1.0, self.up / self.down))) + 2  # input samples a filter reaches, > taps
        self._buf = np.zeros(0, np.float32)
        self._offset = 0  # input index of _buf[0], a multiple of down
        self._n_in = 0  # input samples pushed
        self._n_out = 0  # output samples returned

    def _emit(self, n_out: int) -> np.ndarray:
        """Output samples [_n_out, n_out), from the buffered input; drops input no later output needs."""
        if n_out <= self._n_out:
            return np.zeros(0, np.float32)
        out = resample(self._buf, self.rate_in, self.rate_out)  # output 0 is input time _offset: aligned on down
        first = self._offset * self.up // self.down
        y = out[self._n_out - first: n_out - first]
        self._n_out = n_out
        keep = max(0, (n_out * self.down // self.up - self.reach) // self.down * self.down)  # multiple of down
        if keep > self._offset:
            self._buf, self._offset = self._buf[keep - self._offset:], keep
        return y

    def push(self, block: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(block, np.float32)
        self._buf = np.concatenate([self._buf, np.asarray(block, np.float32)])
        self._n_in += len(block)
        # output j is final once every input its filter reads has come: floor(j * down / up) + reach <= n_in
        return self._emit(max(0, ((self._n_in - self.reach) * self.up) // self.down + 1))

    def flush(self) -> np.ndarray:
        """The last output samples (the input has ended)."""
        if self.up == self.down:
            return np.zeros(0, np.float32)
        return self._emit(int(math.ceil(self._n_in * self.up / self.down)))

