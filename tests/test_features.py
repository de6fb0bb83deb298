"""Log-mel features: numpy runtime path vs torch training path vs transformers' Whisper extractor."""
import numpy as np
import pytest

import tiny
from llasm.runtime.audio import AudioGeometry
from llasm.runtime.features import log_mel, mel_filters


@pytest.mark.parametrize("seconds", [0.37, 1.0, 2.5])
def test_numpy_features_match_torch_training_features(seconds):
    torch = pytest.importorskip("torch")
    from llasm.training.features import log_mel as torch_log_mel

    x = tiny.speech(seconds, seed=3)
    a = log_mel(x)
    b = torch_log_mel(torch.from_numpy(x)).numpy()
    assert a.shape == b.shape == (80, AudioGeometry().n_frames(x.size))
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_match_transformers_whisper_extractor(n_mels):
    transformers = pytest.importorskip("transformers")
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(n_mels), ref.T, atol=1e-7)
    x = tiny.speech(1.3, seed=1)
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    want = fe(x, sampling_rate=16000, padding=False, return_tensors="np").input_features[0]
    np.testing.assert_allclose(log_mel(x, n_mels), want, atol=5e-5)
