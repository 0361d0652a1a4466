"""Processor: full prompts against transformers' Gemma4UnifiedProcessor, and invalid inputs."""

import hashlib

import numpy as np
import pytest
from processing_reference import TINY_TOKENIZER, cases, image_array, image_input, media, processing, processor

PROMPTS = cases()["prompts"]


def replay(inputs: dict) -> dict:
    kwargs = {}
    if inputs.get("text") is not None:
        kwargs["text"] = inputs["text"]
    if "images" in inputs:
        kwargs["images"] = [[image_input(n) for n in sample] for sample in inputs["images"]]
    if "audio" in inputs:
        kwargs["audio"] = [media(n) for n in inputs["audio"]]
    if "videos" in inputs:
        kwargs["videos"] = [media(n) for n in inputs["videos"]]
        kwargs["video_metadata"] = inputs["video_metadata"]
    if "images_kwargs" in inputs:
        kwargs["images_kwargs"] = inputs["images_kwargs"]
    return kwargs


def sha(array, dtype):
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array, dtype=dtype)).tobytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_matches_transformers(name):
    case = PROMPTS[name]
    assert "error" not in case, case.get("error")
    ref = case["outputs"]
    out = processor()(**replay(case["inputs"]))
    assert sorted(out.keys()) == ref["keys"]
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert out[key].dtype == np.int64
        assert out[key].tolist() == ref[key], key
    for key in ("image_position_ids", "video_position_ids"):
        if key in out:
            assert list(out[key].shape) == ref[key + "_shape"]
            assert sha(out[key], np.int64) == ref[key + "_sha256"], key
    for key in ("pixel_values", "pixel_values_videos", "input_features"):
        if key in out:
            assert list(out[key].shape) == ref[key + "_shape"]
            assert sha(out[key], np.float32) == ref[key + "_sha256"], f"{key} not bit-identical"
    if "input_features_mask" in ref:
        assert out["input_features_mask"].tolist() == ref["input_features_mask"]
    if "num_frames_per_video" in ref:
        assert out["num_frames_per_video"].tolist() == ref["num_frames_per_video"]


def test_image_expansion_has_no_separators():
    proc = processor()
    out = proc(text=["x<|image|>y"], images=[[image_input("480x640")]])
    ids = out["input_ids"][0].tolist()
    start = ids.index(proc.boi_token_id)
    assert ids[start + 1:start + 267] == [proc.image_token_id] * 266
    assert ids[start + 267] == proc.eoi_token_id


def test_exactly_one_bos():
    proc = processor()
    bos = proc.tokenizer.bos_token_id
    for text in ("hello", "<bos>hello"):
        ids = proc(text=text)["input_ids"][0].tolist()
        assert ids.count(bos) == 1 and ids[0] == bos, text
    conv = [{"role": "user", "content": "hello"}]
    ids = proc.apply_chat_template(conv, tokenize=True)[0].tolist()
    assert ids.count(bos) == 1 and ids[0] == bos


def test_left_padding_by_default():
    out = processor()(text=["a", "a much longer text"])
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert out["input_ids"][0, 0] == processor().tokenizer.pad_token_id


def test_flat_max_soft_tokens_reaches_images():
    out = processor()(text=["<|image|>"], images=[image_input("224x224")], max_soft_tokens=70)
    assert out["pixel_values"].shape == (1, 70, 6912)
    with pytest.raises(ValueError, match="passed twice"):
        processor()(text=["<|image|>"], images=[image_input("224x224")], max_soft_tokens=70,
                    images_kwargs={"max_soft_tokens": 140})


def test_truncating_soft_tokens_is_an_error():
    with pytest.raises(ValueError, match="soft tokens were cut"):
        processor()(text=["<|image|>"], images=[image_input("224x224")], truncation=True, max_length=20)


# ----------------------------------------------------------------------------- invalid inputs
def test_no_text_and_no_images():
    with pytest.raises(ValueError, match="either `text` or `images`"):
        processor()()


def test_video_without_text():
    with pytest.raises(ValueError, match="videos need a text"):
        processor()(videos=[media("video/v40")])


def test_more_image_markers_than_images():
    with pytest.raises(ValueError, match="Found total 2 <\\|image\\|> tokens and 1 images"):
        processor()(text=["<|image|><|image|>"], images=[image_input("224x224")])


def test_markers_without_images():
    with pytest.raises(ValueError, match="Found 1 <\\|image\\|> tokens in the text but no images"):
        processor()(text=["<|image|>"])


def test_images_per_sample_must_match():
    img = image_input("224x224")
    with pytest.raises(ValueError, match="in each prompt"):
        processor()(text=["<|image|>", "<|image|>"], images=[img, img])  # flat list: one sample of two


def test_more_audio_markers_than_clips():
    with pytest.raises(ValueError, match="Found total 2 <\\|audio\\|> tokens and 1 audio inputs"):
        processor()(text=["<|audio|> <|audio|>"], audio=[media("audio/640")])


def test_more_video_markers_than_videos():
    with pytest.raises(ValueError, match="Found total 2 <\\|video\\|> tokens and 1 videos"):
        processor()(text=["<|video|><|video|>"], videos=[media("video/v40")], video_metadata=[{"fps": 1.0}])


def test_empty_image_in_prompt():
    with pytest.raises(ValueError, match="image 0 is empty"):
        processor()(text=["<|image|>"], images=[np.zeros((0, 5, 3), np.uint8)])


def test_unsupported_max_soft_tokens_in_prompt():
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        processor()(text=["<|image|>"], images=[image_input("224x224")], images_kwargs={"max_soft_tokens": 300})


def test_audio_with_the_wrong_rate():
    with pytest.raises(ValueError, match="22050 Hz but the model takes 16000 Hz"):
        processor()(text=["<|audio|>"], audio=[media("audio/640")], sampling_rate=22050)


def test_unknown_keyword():
    with pytest.raises(TypeError, match="max_soft_token"):
        processor()(text=["hi"], max_soft_token=70)


def test_return_tensors_other_than_numpy():
    with pytest.raises(ValueError, match="jnp.asarray"):
        processor()(text=["hi"], return_tensors="pt")


def test_tokenizer_without_multimodal_tokens():
    tok = processing.Tokenizer.from_pretrained(TINY_TOKENIZER)
    tok.special_tokens.pop("image_token")
    with pytest.raises(ValueError, match="no image_token"):
        processing.Processor(tok)


def test_numpy_gray_image_matches_pil_gray():
    gray = image_array("gray_300x200")
    proc = processor()
    a = proc(text=["<|image|>"], images=[gray[..., None]])
    b = proc(text=["<|image|>"], images=[image_input("gray_300x200")])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_positional_text_first_is_caught():
    with pytest.raises(TypeError, match="text=... by keyword"):
        processor()("hello there")


def test_stereo_array_in_prompt_is_rejected():
    with pytest.raises(ValueError, match="mono"):
        processor()(text=["<|audio|>"], audio=np.zeros((2, 100), np.float32))
