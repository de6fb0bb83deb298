"""Audio input: any rate, stereo, wav/flac/ogg become 16 kHz mono; bad input is one clear error."""
import numpy as np
import pytest

import tiny
from llasm.runtime.audio import AudioError, AudioGeometry, StreamResampler, load_audio, resample

sf = pytest.importorskip("soundfile")


@pytest.mark.parametrize("fmt,rate", [("wav", 44100), ("flac", 48000), ("ogg", 22050), ("wav", 8000)])
def test_files_of_any_rate_and_channels_become_16k_mono(tmp_path, fmt, rate):
    mono = tiny.speech(1.2, rate=rate)
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, stereo, rate)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - int(1.2 * 16000)) <= 2
    want = resample(0.75 * mono, rate, 16000)  # the channel mean
    n = min(want.size, x.size)
    corr = np.corrcoef(x[:n], want[:n])[0, 1]
    assert corr > (0.95 if fmt == "ogg" else 0.999)  # ogg is lossy


@pytest.mark.parametrize("rate", [48000, 44100, 22050])
def test_resampling_keeps_a_tone_and_removes_what_16k_cannot_hold(rate):
    t = np.arange(rate) / rate
    low = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    high = np.sin(2 * np.pi * 9000 * t).astype(np.float32)  # above the 8 kHz Nyquist of 16 kHz
    y_low, y_high = resample(low, rate, 16000), resample(high, rate, 16000)
    assert y_low.size == 16000
    assert 0.69 < np.sqrt(np.mean(y_low[200:-200] ** 2)) < 0.72  # RMS of a unit sine: 0.707 (44.1 kHz gave 0.94)
    assert np.sqrt(np.mean(y_high[200:-200] ** 2)) < 0.02  # (44.1 kHz let 0.25 through, aliased)


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 8000, 16000])
def test_resampling_block_by_block_gives_what_resampling_the_whole_gives(rate):
    x = tiny.speech(1.3, rate=rate)
    stream = StreamResampler(rate)
    rng = np.random.default_rng(0)
    blocks, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 2500))
        blocks.append(stream.push(x[i:i + n]))
        i += n
    blocks.append(stream.flush())
    assert all(b.dtype == np.float32 for b in blocks)
    got, want = np.concatenate(blocks), resample(x, rate, 16000)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert stream._buf.size < 2 * 2500 + 4 * stream.reach  # it keeps only the input later samples read


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"RIFF\x00\x00junk"), "cannot read audio"),
    (lambda p: sf.write(p, np.zeros(16000, np.float32), 16000), "silent"),
    (lambda p: sf.write(p, tiny.speech(0.05), 16000), "too short"),
])
def test_bad_files_are_one_clear_error(tmp_path, make, match):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError, match=match):
        load_audio(path)
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")


def test_geometry_counts_rows_and_chunks():
    g = AudioGeometry(stack_factor=8)
    assert g.embeddings_per_second == 6.25
    assert g.n_embeddings(16000) == 7 + 2  # 100 frames -> 50 encoder frames -> ceil(50 / 8) rows + begin/end
    assert g.chunks(481000) == [(0, 480000), (480000, 481000)]
    with pytest.raises(ValueError, match="n_mels"):
        AudioGeometry(n_mels=64)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_the_bytes_of_an_audio_file_read_as_the_file_does(tmp_path, fmt):
    import io

    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) does not write {fmt}")
    x = tiny.speech(1.0, rate=22050)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, x, 22050, format=fmt)
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(data), load_audio(path))
    np.testing.assert_array_equal(load_audio(memoryview(data)), load_audio(io.BytesIO(data).getvalue()))


def test_bytes_that_are_no_audio_are_one_clear_error():
    with pytest.raises(AudioError, match=r"the audio is empty \(0 bytes\)"):
        load_audio(b"")
    with pytest.raises(AudioError, match="cannot read audio from 17 bytes of audio: .+"):
        load_audio(b"this is not audio")
    import io

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
    with pytest.raises(AudioError, match="bytes of audio is silent"):
        load_audio(buf.getvalue())
