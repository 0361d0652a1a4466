"""Audio: recorded transformers features, framing rule, file loading and resampling."""

import numpy as np
import pytest
import soundfile
from processing_reference import cases, media, npz, processing

AUDIO_CASES = cases()["audio_cases"]


@pytest.fixture(scope="module")
def extractor():
    return processing.AudioFeatureExtractor()


@pytest.mark.parametrize("case", AUDIO_CASES, ids=[str(c["samples"]) for c in AUDIO_CASES])
def test_audio_matches_transformers(extractor, case):
    n = case["samples"]
    out = extractor(media(f"audio/{n}"))
    np.testing.assert_array_equal(out["input_features"], npz("audio")[f"audio_features/{n}"])
    np.testing.assert_array_equal(out["input_features_mask"], npz("audio")[f"audio_mask/{n}"])
    assert out["input_features"].dtype == np.float32 and out["input_features_mask"].dtype == np.bool_
    assert int(out["input_features_mask"].sum()) == case["frames"] == -(-n // 640)


def test_audio_batch_matches_transformers(extractor):
    clips = [media(f"audio/{n}") for n in cases()["audio_batch"]]
    out = extractor(clips)
    np.testing.assert_array_equal(out["input_features"], npz("audio")["audio_batch_features"])
    np.testing.assert_array_equal(out["input_features_mask"], npz("audio")["audio_batch_mask"])


def test_empty_audio_gives_zero_frames(extractor):
    out = extractor([np.zeros(0, np.float32)])
    assert list(out["input_features"].shape) == cases()["audio_empty_shape"] == [1, 0, 640]


@pytest.mark.parametrize("n,frames", [(1, 1), (640, 1), (641, 2), (16000, 25), (40000, 63), (480000, 750)])
def test_frame_counts(extractor, n, frames):
    out = extractor(np.ones(n, np.float32))
    assert out["input_features"].shape == (1, frames, 640)
    assert out["input_features"][0].reshape(-1)[n:].sum() == 0  # zero-padded tail


def test_max_length_padding_and_truncation(extractor):
    clip = np.arange(2000, dtype=np.float32)
    out = extractor([clip], padding="max_length", max_length=6)
    assert out["input_features"].shape == (1, 6, 640) and out["input_features_mask"].sum() == 4
    out = extractor([clip], max_length=2, truncation=True)
    assert out["input_features"].shape == (1, 2, 640)
    with pytest.raises(ValueError, match="truncation=True"):
        extractor([clip], padding="max_length", max_length=2)


def test_wrong_sampling_rate_is_rejected(extractor):
    with pytest.raises(ValueError, match="44100 Hz but the model takes 16000 Hz"):
        extractor(np.zeros(100, np.float32), sampling_rate=44100)


def test_multichannel_array_is_rejected(extractor):
    with pytest.raises(ValueError, match="mono"):
        extractor(np.zeros((2, 100), np.float32))


def write(path, data, rate):
    soundfile.write(str(path), data, rate, subtype="FLOAT" if str(path).endswith(".wav") else None)
    return path


def test_load_audio_16k_mono(tmp_path):
    clip = np.sin(np.arange(1600) / 10).astype(np.float32) * 0.5
    np.testing.assert_allclose(processing.load_audio(write(tmp_path / "a.wav", clip, 16000)), clip, atol=1e-7)


def test_load_audio_other_rate_needs_resample(tmp_path):
    path = write(tmp_path / "b.wav", np.zeros(4410, np.float32), 44100)
    with pytest.raises(ValueError, match="sampled at 44100 Hz but the model takes 16000 Hz; pass resample=True"):
        processing.load_audio(path)
    assert processing.load_audio(path, resample=True).shape == (1600,)


def test_load_audio_stereo_needs_downmix(tmp_path):
    stereo = np.stack([np.full(800, 0.25), np.full(800, 0.75)], axis=1).astype(np.float32)
    path = write(tmp_path / "c.flac", stereo, 16000)
    with pytest.raises(ValueError, match="2 channels but the model takes mono; pass downmix=True"):
        processing.load_audio(path)
    np.testing.assert_allclose(processing.load_audio(path, downmix=True), 0.5, atol=1e-4)


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone(orig):
    t = np.arange(orig) / orig  # one second of 440 Hz
    out = processing.resample_audio(np.sin(2 * np.pi * 440 * t), orig, 16000)
    assert out.shape == (16000,) and out.dtype == np.float32
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(out[400:-400] - expected[400:-400]).max() < 2e-3


def test_resample_removes_content_above_the_new_nyquist():
    t = np.arange(48000) / 48000
    out = processing.resample_audio(np.sin(2 * np.pi * 12000 * t), 48000, 16000)  # 12 kHz > 8 kHz Nyquist
    assert np.abs(out[400:-400]).max() < 1e-2
