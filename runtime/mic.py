"""Microphone input for push-to-talk: record 16 kHz mono float32, with a live level and silence trimming.

    rec = Recorder()              # the default input device; sounddevice is imported on first use
    rec.start()                   # capture runs in PortAudio's callback thread
    rec.level_db, rec.seconds     # readable while recording (for a level meter)
    samples = rec.stop()          # float32 at 16 kHz, leading/trailing silence trimmed

    rec.start(sink=listener.feed) # the same, handing each 16 kHz block on as it comes (Chat.listen)

sounddevice (and the PortAudio library under it) is optional at run time: without it files and text still work,
and only the microphone raises MicError with an install hint.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from .audio import SAMPLE_RATE, AudioError, StreamResampler

log = logging.getLogger(__name__)

INSTALL_HINT = "push-to-talk needs sounddevice and PortAudio: pip install sounddevice; apt install libportaudio2"
MAX_SECONDS = 60.0  # longest recording; capture stops there
FLOOR_DB = -100.0  # dBFS reported for digital silence

# Silence trimming (energy on short frames, threshold relative to the noise floor)
FRAME_SECONDS = 0.02  # 20 ms frames
MARGIN_SECONDS = 0.2  # kept before the first and after the last voiced frame
SILENT_DBFS = -60.0  # a recording whose loudest frame is below this holds no speech
MIN_FLOOR_DBFS = -70.0  # noise floor used when the recording has cleaner silence than this (digital zeros)
MIN_CONTRAST_DB = 10.0  # voiced frames are at least this far above the floor
NOISE_PERCENTILE = 10  # the quietest 10% of frames estimate the noise floor


class MicError(AudioError):
    """The microphone cannot be used: sounddevice/PortAudio missing, no input device, or a device error."""


def _why(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: sounddevice is installed but libportaudio is not
        raise MicError(f"{INSTALL_HINT} ({_why(e)})") from None
    return sounddevice


def _device(device):
    """'3' means device index 3; other strings are name substrings (sounddevice's rule)."""
    return int(device) if isinstance(device, str) and device.strip().isdigit() else device


def input_device(device=None) -> dict:
    """The input device sounddevice would record from (its query_devices dict); MicError if there is none."""
    sd = _sounddevice()
    try:
        return sd.query_devices(_device(device), "input")
    except (ValueError, sd.PortAudioError) as e:
        which = "no default input device" if device is None else f"no input device {device!r}"
        raise MicError(f"{which}: {_why(e)}; plug in a microphone or pick one with --mic-device "
                       f"(python -m sounddevice lists them)") from None


def sounddevice_stream(device=None) -> Callable:
    """A stream factory: callback -> sounddevice.InputStream, 16 kHz mono where the device takes it, else the
    device's default rate (the Recorder resamples)."""

    def factory(callback):
        sd = _sounddevice()
        info = input_device(device)
        dev = _device(device)
        try:
            sd.check_input_settings(device=dev, channels=1, dtype="float32", samplerate=SAMPLE_RATE)
            rate = SAMPLE_RATE
        except (ValueError, sd.PortAudioError):
            rate = int(info["default_samplerate"])
        try:
            return sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=dev, callback=callback)
        except (ValueError, sd.PortAudioError) as e:
            raise MicError(f"cannot open microphone {info['name']!r} at {rate} Hz: {_why(e)}") from None

    return factory


def rms_db(x: np.ndarray) -> float:
    """RMS level in dBFS (full scale = 1.0); FLOOR_DB for digital silence."""
    if x.size == 0:
        return FLOOR_DB
    ms = float(np.mean(np.square(x, dtype=np.float64)))
    return max(FLOOR_DB, 10.0 * np.log10(ms)) if ms > 0 else FLOOR_DB


def voiced_span(samples: np.ndarray, sample_rate: int = SAMPLE_RATE,
                margin: float = MARGIN_SECONDS) -> tuple[int, int] | None:
    """(start, end) sample range of the speech with `margin` seconds around it; None if all of it is silent.

    A frame is voiced when its energy is MIN_CONTRAST_DB (or a third of the floor-to-peak range, if more) above
    the noise floor. A recording with no such contrast (speech throughout, or steady noise) is kept whole."""
    frame = max(1, int(round(FRAME_SECONDS * sample_rate)))
    n = samples.size // frame
    if n == 0:
        return None if rms_db(samples) < SILENT_DBFS else (0, samples.size)
    frames = samples[: n * frame].astype(np.float64).reshape(n, frame)  # (n_frames, frame)
    db = 10.0 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)  # (n_frames,)
    peak = float(db.max())
    if peak < SILENT_DBFS:
        return None
    floor = max(float(np.percentile(db, NOISE_PERCENTILE)), MIN_FLOOR_DBFS)
    if peak - floor < MIN_CONTRAST_DB:
        return 0, samples.size
    voiced = np.flatnonzero(db > floor + max(MIN_CONTRAST_DB, (peak - floor) / 3))
    keep = int(round(margin * sample_rate))
    return max(0, voiced[0] * frame - keep), min(samples.size, (voiced[-1] + 1) * frame + keep)


def trim_silence(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, margin: float = MARGIN_SECONDS) -> np.ndarray:
    """Cut leading and trailing silence, keeping `margin` seconds around the speech (voiced_span); empty if all of
    it is silent."""
    span = voiced_span(samples, sample_rate, margin)
    return samples[:0] if span is None else samples[span[0]:span[1]]


class Recorder:
    """Push-to-talk capture from an input stream, mono float32 at 16 kHz.

    stream_factory(callback) returns an object with start(), stop(), close() and samplerate that calls
    callback(indata, frames, time, status) with (frames, channels) float blocks from another thread, as
    sounddevice.InputStream does; the default opens the sounddevice input `device`. Tests pass a fake."""

    def __init__(self, device=None, max_seconds: float = MAX_SECONDS, trim: bool = True,
                 stream_factory: Callable | None = None):
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.max_seconds = max_seconds
        self.trim = trim
        self.stream_factory = stream_factory or sounddevice_stream(device)
        self._lock = threading.Lock()
        self._stream = None
        self._blocks: list[np.ndarray] = []  # 16 kHz
        self._resampler = None  # device rate -> 16 kHz, block by block
        self._sink = None
        self._n = 0  # samples captured, at the stream's rate
        self._rate = SAMPLE_RATE
        self._limit = 0
        self._level = FLOOR_DB
        self.capped = False  # the recording reached max_seconds and stopped growing
        self.status = ""  # the last non-empty stream status (input overflow...)

    @property
    def recording(self) -> bool:
        return self._stream is not None

    @property
    def seconds(self) -> float:
        """Audio captured so far."""
        return self._n / self._rate

    @property
    def level_db(self) -> float:
        """RMS level of the latest block, dBFS."""
        return self._level

    def start(self, sink: Callable | None = None) -> None:
        """Start capturing. sink: called with each block of 16 kHz float32 samples as it comes (from the audio
        thread: it must return quickly), and with the last ones at stop()."""
        if self._stream is not None:
            raise MicError("the recorder is already recording")
        with self._lock:
            self._blocks, self._n, self._level, self.capped, self.status = [], 0, FLOOR_DB, False, ""
        stream = self.stream_factory(self._callback)
        self._rate = int(stream.samplerate)
        self._limit = int(round(self.max_seconds * self._rate))
        self._resampler = StreamResampler(self._rate) if self._rate != SAMPLE_RATE else None
        self._sink = sink
        try:
            stream.start()
        except MicError:
            raise
        except Exception as e:  # sounddevice.PortAudioError and whatever a host API raises
            stream.close()
            raise MicError(f"microphone error: {_why(e)}") from e
        self._stream = stream

    def _callback(self, indata, frames, time, status) -> None:
        if status:
            self.status = str(status)
        block = np.asarray(indata, dtype=np.float32)
        if block.ndim == 2:  # (frames, channels) -> (frames,)
            block = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
        with self._lock:
            room = self._limit - self._n
            if room <= 0:
                self.capped = True
                return
            block = block[:room].copy()  # sounddevice reuses its buffer after the callback returns
            self._n += block.size
            self._level = rms_db(block)
            if self._n >= self._limit:
                self.capped = True
            self._add(self._resampler.push(block) if self._resampler else block)

    def _add(self, block: np.ndarray) -> None:
        if block.size:
            self._blocks.append(block)
            if self._sink is not None:
                self._sink(block)

    def stop(self) -> np.ndarray:
        """Stop capturing and return the recording: float32 at 16 kHz, silence trimmed (empty if all silent)."""
        stream, self._stream = self._stream, None
        if stream is None:
            raise MicError("the recorder is not recording")
        try:
            stream.stop()
        except Exception as e:  # the device went away mid-recording
            raise MicError(f"microphone error: {_why(e)}") from e
        finally:
            stream.close()
        if self.status:
            log.warning("microphone: %s", self.status)
        if self.capped:
            log.info("recording stopped at the %.0f s limit", self.max_seconds)
        with self._lock:
            if self._resampler is not None:
                self._add(self._resampler.flush())
            samples = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.float32)
            self._level = FLOOR_DB
            self._sink = None
        return trim_silence(samples) if self.trim else samples
