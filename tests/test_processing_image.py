"""Image processor: recorded transformers outputs, the size rule, layout and invalid inputs."""

import numpy as np
import PIL.Image
import pytest
from processing_reference import agreement, cases, decode_png, image_array, image_input, npz, patches_of, processing

IMAGE_CASES = cases()["image_cases"]
ONE_LEVEL = 1 / 255 + 1e-7


@pytest.fixture(scope="module")
def image_processor():
    return processing.ImageProcessor()


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c["key"] for c in IMAGE_CASES])
def test_image_matches_transformers(image_processor, case):
    out = image_processor(image_input(case["image"]), max_soft_tokens=case["max_soft_tokens"])
    s = case["max_soft_tokens"]
    assert out["pixel_values"].shape == (1, s, 6912) and out["pixel_values"].dtype == np.float32
    assert out["image_position_ids"].dtype == np.int64
    assert out["num_soft_tokens_per_image"] == [case["num_soft_tokens"]]
    np.testing.assert_array_equal(out["image_position_ids"][0], npz("images")[f"positions/{case['key']}"])

    n = case["num_soft_tokens"]
    reference = patches_of(decode_png(npz("images")[f"resized_png/{case['key']}"]), rescale="multiply")
    max_diff, frac_equal = agreement(out["pixel_values"][0, :n], reference)
    assert max_diff <= ONE_LEVEL, f"{case['key']}: max diff {max_diff}"
    assert frac_equal >= 0.999, f"{case['key']}: only {frac_equal:.5f} exactly equal"
    assert not out["pixel_values"][0, n:].any()


def test_batch_of_images_equals_one_by_one(image_processor):
    names = cases()["image_batch"]
    batch = image_processor([image_input(n) for n in names])
    for i, name in enumerate(names):
        single = image_processor(image_input(name))
        np.testing.assert_array_equal(batch["pixel_values"][i], single["pixel_values"][0])
        np.testing.assert_array_equal(batch["image_position_ids"][i], single["image_position_ids"][0])


def test_nested_images_are_flattened_in_order(image_processor):
    a, b, c = (image_input(n) for n in ("pil_1x1", "224x224", "500x30"))
    nested = image_processor([[a], [b, c]])
    flat = image_processor([a, b, c])
    np.testing.assert_array_equal(nested["pixel_values"], flat["pixel_values"])


# (H, W) -> resized (H, W) and soft tokens for S = 280, and the video-frame budget S = 70 (spec §1.2).
SIZE_TABLE = [
    ((480, 640), (672, 912), 266, (336, 432), 63),
    ((1024, 1024), (768, 768), 256, (384, 384), 64),
    ((224, 224), (768, 768), 256, (384, 384), 64),
    ((1, 1), (768, 768), 256, (384, 384), 64),
    ((1080, 1920), (576, 1056), 264, (288, 528), 66),
    ((300, 100), (1344, 432), 252, (672, 192), 56),
    ((500, 30), (3264, 192), 272, (1632, 96), 68),
    ((10, 2000), (48, 11328), 236, (48, 3360), 70),
]


@pytest.mark.parametrize("size,resized,tokens,frame,frame_tokens", SIZE_TABLE)
def test_target_size_table(image_processor, size, resized, tokens, frame, frame_tokens):
    assert image_processor.target_size(*size) == resized
    assert image_processor.num_soft_tokens(*size) == tokens
    assert image_processor.target_size(*size, max_soft_tokens=70) == frame
    assert image_processor.num_soft_tokens(*size, max_soft_tokens=70) == frame_tokens


# transformers' own test vectors: (patch, max_patches, k, H, W) -> (h, w).
@pytest.mark.parametrize("args,expected", [
    ((16, 256, 1, 256, 256), (256, 256)), ((16, 256, 1, 512, 512), (256, 256)),
    ((10, 200, 1, 50, 10000), (10, 2000)), ((16, 2304, 6, 2785, 34), (6144, 96)),
    ((4, 64, 2, 50, 1000), (8, 128)), ((5, 100, 3, 100, 100), (45, 45)), ((5, 20, 3, 5, 100), (15, 30)),
])
def test_aspect_ratio_preserving_size_vectors(args, expected):
    p, max_patches, k, h, w = args
    assert processing.aspect_ratio_preserving_size(h, w, p, max_patches, k) == expected


def test_patch_layout_is_row_col_rgb_raster_with_xy_positions(image_processor):
    # A 96 x 144 image needs no resize at S = 70? It does not fit exactly, so build one that does.
    h, w = image_processor.target_size(96, 144, max_soft_tokens=70)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = image_processor(image, max_soft_tokens=70)
    cols = w // 48
    for i in (0, 1, cols, cols + 2):
        y, x = divmod(i, cols)
        block = image[y * 48:(y + 1) * 48, x * 48:(x + 1) * 48].astype(np.float32) * np.float32(1 / 255)
        np.testing.assert_array_equal(out["pixel_values"][0, i], block.reshape(-1))  # (row, col, RGB)
        assert tuple(out["image_position_ids"][0, i]) == (x, y)


def test_grayscale_and_alpha_arrays(image_processor):
    gray = image_array("np_gray_120x90")
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_array_equal(image_processor(gray)["pixel_values"], image_processor(rgb)["pixel_values"])
    opaque = np.concatenate([rgb, np.full_like(gray, 255)], axis=-1)
    np.testing.assert_array_equal(image_processor(opaque)["pixel_values"], image_processor(rgb)["pixel_values"])
    clear = np.concatenate([rgb, np.zeros_like(gray)], axis=-1)
    assert (image_processor(clear)["pixel_values"][0, :10] == 1.0).all()  # fully transparent -> white


def test_image_file_paths(tmp_path, image_processor):
    path = tmp_path / "img.png"
    PIL.Image.fromarray(image_array("480x640")).save(path)
    np.testing.assert_array_equal(image_processor(str(path))["pixel_values"],
                                  image_processor(image_array("480x640"))["pixel_values"])


def test_resize_of_large_image_is_fast(image_processor):
    import time
    image = image_array("1080x1920")
    start = time.perf_counter()
    image_processor(image)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("bad", [0, 100, 281, 2240])
def test_unsupported_max_soft_tokens(bad):
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        processing.ImageProcessor(max_soft_tokens=bad)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        processing.ImageProcessor()(image_array("224x224"), max_soft_tokens=bad)


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 0, 3), (0, 0, 3)])
def test_empty_image_array(image_processor, shape):
    with pytest.raises(ValueError, match="empty"):
        image_processor(np.zeros(shape, np.uint8))


def test_zero_pixel_pil_image(image_processor):
    with pytest.raises(ValueError, match="empty"):
        image_processor(PIL.Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("array,message", [
    (np.zeros((10, 10), np.uint8), "channel axis"),
    (np.zeros((3, 10, 10), np.uint8), "channels-first"),
    (np.zeros((10, 10, 2), np.uint8), r"\(H, W, C\)"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
])
def test_unsupported_arrays(image_processor, array, message):
    with pytest.raises((ValueError, TypeError), match=message):
        image_processor(array)


def test_unknown_keyword(image_processor):
    with pytest.raises(TypeError, match="max_soft_token"):
        image_processor(image_array("224x224"), max_soft_token=70)
