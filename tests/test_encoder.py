"""The real-length Whisper encoder against transformers' own, and padded batches against single items."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny  # noqa: E402
from llasm.training.adaptor import AdaptorConfig, StackMLPAdaptor  # noqa: E402
from llasm.training.whisper import WhisperEncoder, encoder_config_from_hf, encoder_state_from_hf  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = transformers.WhisperModel(tiny.whisper_config()).eval()
    ours = WhisperEncoder(encoder_config_from_hf(hf.config)).eval()
    ours.load_state_dict(encoder_state_from_hf(hf.state_dict()))
    return hf, ours


def test_matches_transformers_on_a_full_window(pair):
    hf, ours = pair
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        want = hf.encoder(mel).last_hidden_state
        got = ours(mel)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_items_alone(pair):
    _, ours = pair
    lengths = [37, 120, 91]
    mels = [torch.randn(1, 80, n) for n in lengths]
    batch = torch.zeros(3, 80, 120)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[-1]] = m[0]
    with torch.no_grad():
        out = ours(batch, torch.tensor(lengths))
        for i, m in enumerate(mels):
            alone = ours(m)[0]
            torch.testing.assert_close(out[i, : alone.shape[0]], alone, atol=1e-5, rtol=1e-5)


def test_adaptor_rows_follow_the_geometry():
    from llasm.runtime.audio import AudioGeometry

    cfg = AdaptorConfig(d_encoder=32, d_llm=48, stack_factor=3)
    adaptor = StackMLPAdaptor(cfg)
    geo = AudioGeometry(stack_factor=3)
    for n_samples in (1600, 16000, 16160, 33333):
        n_enc = geo.n_encoder_frames(geo.n_frames(n_samples))
        rows = adaptor(torch.randn(1, n_enc, 32))
        assert rows.shape == (1, geo.n_embeddings(n_samples), 48)
        torch.testing.assert_close(rows[0, 0], adaptor.boundary[0])
        torch.testing.assert_close(rows[0, -1], adaptor.boundary[1])
