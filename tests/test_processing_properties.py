"""Property tests: counts of placeholders always equal valid patches / frames, positions stay in the grid."""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processing_reference import processing, processor

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.integers(min_value=1, max_value=4000)
soft_tokens = st.sampled_from(processing.SUPPORTED_SOFT_TOKENS)


@SETTINGS
@given(h=sizes, w=sizes, s=soft_tokens)
def test_target_size_fits_the_budget(h, w, s):
    th, tw = processing.ImageProcessor().target_size(h, w, max_soft_tokens=s)
    assert th % 48 == 0 and tw % 48 == 0 and th >= 48 and tw >= 48
    assert (th // 48) * (tw // 48) <= s
    assert th * tw <= s * 9 * 256


@SETTINGS
@given(h=st.integers(1, 60), w=st.integers(1, 60), s=st.sampled_from([70, 140]), seed=st.integers(0, 2**16))
def test_image_patches_and_positions(h, w, s, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    proc = processing.ImageProcessor()
    out = proc(image, max_soft_tokens=s)
    n = out["num_soft_tokens_per_image"][0]
    pos = out["image_position_ids"][0]
    th, tw = proc.target_size(h, w, s)
    assert n == proc.num_soft_tokens(h, w, s) == (pos[:, 0] >= 0).sum()
    assert (pos[:n, 0] < tw // 48).all() and (pos[:n, 1] < th // 48).all() and (pos[:n] >= 0).all()
    assert (pos[n:] == -1).all() and not out["pixel_values"][0, n:].any()
    values = out["pixel_values"][0, :n]
    assert values.min() >= 0.0 and values.max() <= 1.0


@SETTINGS
@given(lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=4))
def test_audio_frames(lengths):
    clips = [np.ones(n, np.float32) for n in lengths]
    out = processing.AudioFeatureExtractor()(clips)
    frames = [math.ceil(n / 640) for n in lengths]
    assert out["input_features"].shape == (len(lengths), max(frames), 640)
    assert out["input_features_mask"].sum(axis=1).tolist() == frames
    for i, n in enumerate(lengths):
        assert out["input_features"][i].reshape(-1).sum() == n  # the samples, then zeros


words = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<|>\x00"), max_size=12)


@st.composite
def prompts(draw):
    """A batch of texts with markers in random places, and matching media."""
    batch = draw(st.integers(1, 3))
    texts, images, audio, videos = [], [], [], []
    for _ in range(batch):
        pieces, sample_images = [draw(words)], []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["image", "audio", "video"]))
            pieces.append(f"<|{kind}|>")
            pieces.append(draw(words))
            if kind == "image":
                sample_images.append(np.full((draw(st.integers(1, 40)), draw(st.integers(1, 40)), 3),
                                             draw(st.integers(0, 255)), np.uint8))
            elif kind == "audio":
                audio.append(np.zeros(draw(st.integers(0, 3000)), np.float32))
            else:
                videos.append(np.zeros((draw(st.integers(1, 3)), draw(st.integers(1, 30)), draw(st.integers(1, 30)), 3),
                                       np.uint8))
        texts.append("".join(pieces))
        images.append(sample_images)
    return texts, images, audio, videos


@SETTINGS
@given(case=prompts())
def test_placeholders_match_media(case):
    texts, images, audio, videos = case
    proc = processor()
    out = proc(
        text=texts,
        images=images if any(images) else None,
        audio=audio or None,
        videos=videos or None,
        video_metadata=[{"fps": 1.0} for _ in videos] or None,
        videos_kwargs={"do_sample_frames": False},
    )
    ids, types = out["input_ids"], out["mm_token_type_ids"]
    n_images = sum(len(s) for s in images)
    if n_images:
        valid = (out["image_position_ids"][..., 0] >= 0).sum()
        assert (ids == proc.image_token_id).sum() == valid == (types == 1).sum()
        assert (ids == proc.boi_token_id).sum() == n_images + out.get("pixel_values_videos", np.zeros((0,))).shape[0]
    if videos:
        valid = (out["video_position_ids"][..., 0] >= 0).sum()
        assert (ids == proc.video_token_id).sum() == valid == (types == 2).sum()
        assert out["num_frames_per_video"].tolist() == [len(v) for v in videos]
    if audio:
        assert (ids == proc.audio_token_id).sum() == out["input_features_mask"].sum() == (types == 3).sum()
        assert (ids == proc.boa_token_id).sum() == len(audio)
    assert ((types != 0) == np.isin(ids, [proc.image_token_id, proc.video_token_id, proc.audio_token_id])).all()
    assert (out["attention_mask"].sum(axis=1) > 0).all()
    assert (ids[:, -1] != proc.tokenizer.pad_token_id).all()  # left padding


@SETTINGS
@given(n_markers=st.integers(0, 4), n_images=st.integers(0, 4))
def test_marker_and_image_counts_must_agree(n_markers, n_images):
    image = np.zeros((8, 8, 3), np.uint8)
    call = lambda: processor()(text=["<|image|>" * n_markers + "x"], images=[[image] * n_images] if n_images else None)  # noqa: E731
    if n_markers == n_images:
        call()
    else:
        try:
            call()
        except ValueError as err:
            assert "<|image|>" in str(err)
        else:
            raise AssertionError("a count mismatch must raise")
