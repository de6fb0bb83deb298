"""Whisper log-mel features in torch, for batches on the training device; matches runtime.features."""
from __future__ import annotations

import torch

from ..runtime.audio import HOP_LENGTH, N_FFT
from ..runtime.features import mel_filters


def log_mel(samples: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """(n_samples,) float -> (n_mels, n_samples // HOP_LENGTH); one chunk, as runtime.features.log_mel."""
    window = torch.hann_window(N_FFT, device=samples.device)
    stft = torch.stft(samples.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (n_fft // 2 + 1, n_frames)
    filters = torch.from_numpy(mel_filters(n_mels)).to(samples.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
