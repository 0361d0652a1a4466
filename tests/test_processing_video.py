"""Video processor: recorded transformers outputs, frame sampling, timestamps and invalid inputs."""

import hashlib

import numpy as np
import pytest
from processing_reference import agreement, cases, decode_png, media, npz, patches_of, processing

VIDEO_CASES = cases()["video_cases"]
CALLS = {
    "v40_fps10": dict(videos=["video/v40"], video_metadata=[{"fps": 10.0, "total_num_frames": 40}]),
    "v300_fps30": dict(videos=["video/v300"], video_metadata=[{"fps": 30.0, "total_num_frames": 300}]),
    "v5_v3_unsampled": dict(videos=["video/v5", "video/v3"], do_sample_frames=False,
                            video_metadata=[{"fps": 2.0, "total_num_frames": 5}, {"fps": 1.0, "total_num_frames": 3}]),
}


def run(name):
    call = dict(CALLS[name])
    call["videos"] = [media(v) for v in call["videos"]]
    return processing.VideoProcessor()(**call)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_video_matches_transformers(name):
    ref = VIDEO_CASES[name]
    out = run(name)
    assert list(out["pixel_values_videos"].shape) == ref["pixel_values_videos_shape"]
    assert out["num_frames_per_video"] == ref["num_frames_per_video"]
    assert out["num_soft_tokens_per_video"] == ref["num_soft_tokens_per_video"]
    np.testing.assert_array_equal(out["video_position_ids"], npz("video")[f"video_positions/{name}"])
    for meta, indices in zip(out["video_metadata"], ref["frames_indices"]):
        if indices is not None:
            assert meta.frames_indices == indices

    # Every frame bit-exact (hash of the uint8 grid), and a few frames compared value by value.
    start = 0
    frames = []
    for count, tokens in zip(out["num_frames_per_video"], out["num_soft_tokens_per_video"]):
        for t in range(start, start + count):
            positions = out["video_position_ids"][t]
            cols = positions[:tokens, 0].max() + 1
            rows = tokens // cols
            pv = out["pixel_values_videos"][t, :tokens].reshape(rows, cols, 48, 48, 3)
            image = pv.transpose(0, 2, 1, 3, 4).reshape(rows * 48, cols * 48, 3)
            frames.append(np.rint(image.astype(np.float64) * 255).astype(np.uint8))
            assert not out["pixel_values_videos"][t, tokens:].any()
        start += count
    digest = hashlib.sha256(np.concatenate([f.reshape(-1) for f in frames]).tobytes()).hexdigest()
    assert digest == ref["frames_sha256"]
    for key, png in npz("video").items():
        if key.startswith(f"video_frame_png/{name}/"):
            t = int(key.rsplit("/", 1)[1])
            reference = patches_of(decode_png(png), rescale="divide")
            n = reference.shape[0]
            max_diff, frac = agreement(out["pixel_values_videos"][t, :n], reference)
            assert max_diff == 0.0 and frac == 1.0


def test_video_rescale_is_a_division_by_255():
    # transformers fuses rescale + identity normalisation into (x - 0) / 255 for video (spec §2 note).
    out = run("v5_v3_unsampled")
    values = np.unique(out["pixel_values_videos"])
    grid = np.arange(256, dtype=np.float32) / np.float32(255.0)
    assert np.isin(values, grid).all()


def test_frame_sampling_indices():
    idx = processing.sample_frame_indices(300, 32, None, 30.0)
    assert idx[:8].tolist() == [0, 9, 18, 28, 37, 46, 56, 65]
    assert idx[-2:].tolist() == [281, 290]
    assert processing.sample_frame_indices(32, 32, None, None).tolist() == list(range(32))
    assert processing.sample_frame_indices(7, None, None, None).tolist() == list(range(7))
    assert len(processing.sample_frame_indices(100, None, 2, 10.0)) == 20


def test_timestamps_truncate_to_mm_ss():
    meta = processing.VideoMetadata(total_num_frames=300, fps=30.0, frames_indices=[0, 29, 30, 1799, 1800, 3599])
    from gemma4_eqx.processing.video import timestamp_strings
    assert timestamp_strings(meta.timestamps) == ["00:00", "00:00", "00:01", "00:59", "01:00", "01:59"]


def test_recorded_timestamps():
    out = run("v300_fps30")
    assert out["video_metadata"][0].timestamps == VIDEO_CASES["v300_fps30"]["timestamps"][0]


def test_too_few_frames_for_sampling():
    with pytest.raises(ValueError, match="cannot sample num_frames=32 frames from a video of 5 frames"):
        processing.VideoProcessor()(media("video/v5"), video_metadata={"fps": 2.0})


def test_missing_fps_warns_and_assumes_24():
    with pytest.warns(UserWarning, match="24 fps"):
        out = processing.VideoProcessor()(media("video/v40"))
    assert out["video_metadata"][0].timestamps[1] == 1 / 24


def test_metadata_frame_count_must_match():
    with pytest.raises(ValueError, match="says 41 frames but the array has 40"):
        processing.VideoProcessor()(media("video/v40"), video_metadata={"fps": 1.0, "total_num_frames": 41})


def test_metadata_count_must_match_videos():
    with pytest.raises(ValueError, match="2 videos but 1 video_metadata"):
        processing.VideoProcessor()([media("video/v40"), media("video/v40")], video_metadata=[{"fps": 1.0}])


def test_empty_video():
    with pytest.raises(ValueError, match="no frames"):
        processing.VideoProcessor()(np.zeros((0, 10, 10, 3), np.uint8), video_metadata={"fps": 1.0})
