"""Multimodal inputs: vmap over a batch equals one sequence at a time; wrong inputs fail with clear messages."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.batching import split_batch

import hf_reference as ref
import test_hf_parity
from test_hf_parity import MASK_MODES, multimodal_logits

MM = ["mm_images_batch", "mm_two_images", "mm_audio", "mm_video", "mm_mixed"]


def model():
    """tiny_a in fp32: the model (and the loaded arrays) of test_hf_parity.py."""
    return test_hf_parity.model("tiny_a", "float32")


@functools.partial(jax.jit, static_argnames="mask_modes")
def one_sequence_logits(m, sample, mask_modes=MASK_MODES):
    """{mask mode: logits} of one sequence; the model is an argument, so samples of one shape share one program."""
    return {mode: m(**sample, mask_mode=mode) for mode in mask_modes}


def _inputs(case_name):
    case = ref.cases("tiny_a")[case_name]
    return {k: v for k, v in ref.inputs(case).items() if k != "num_frames_per_video"}


@pytest.mark.parametrize("case_name", MM)
@pytest.mark.parametrize("mode", ["intended", "hf_forward"])
def test_vmap_over_a_batch_equals_one_sequence_at_a_time(case_name, mode):
    m = model()
    samples = split_batch(_inputs(case_name), m.config)
    # the vmapped forward over the stacked batch, from the program test_hf_parity.py compares with transformers
    batched = multimodal_logits("tiny_a", case_name)[mode]
    for b, sample in enumerate(samples):
        alone = one_sequence_logits(m, sample)[mode]
        # batched and single kernels sum in different orders: fp32 rounding only (measured <= 1.5e-5)
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(alone), atol=5e-5, rtol=0)


def test_mask_modes_differ_only_with_vision_blocks():
    m = model()
    for case_name, differ in (("mm_images_batch", True), ("mm_audio", False)):
        s = split_batch(_inputs(case_name), m.config)[0]
        logits = one_sequence_logits(m, s)  # the program of the test above (sample 0)
        a, b = np.asarray(logits["intended"]), np.asarray(logits["hf_forward"])
        assert bool(np.any(np.abs(a - b) > 1e-3)) == differ


def test_image_features_keep_padding_rows_and_match_the_splice():
    m = model()
    s = split_batch(_inputs("mm_images_batch"), m.config)[0]
    feats = m.image_features(s["pixel_values"], s["image_position_ids"])
    assert feats.shape == s["pixel_values"].shape[:2] + (m.config.text.hidden_size,)
    valid = np.all(s["image_position_ids"] != -1, axis=-1)
    spliced = m.embed(s["input_ids"], pixel_values=s["pixel_values"], image_position_ids=s["image_position_ids"])
    slots = np.asarray(s["input_ids"]) == m.config.image_token_id
    np.testing.assert_array_equal(np.asarray(spliced)[slots], np.asarray(feats)[valid])


def test_soft_tokens_are_not_scaled_and_placeholders_are_embedded_as_pad():
    m = model()
    s = split_batch(_inputs("mm_audio"), m.config)[0]
    ids = np.asarray(s["input_ids"])
    with pytest.raises(ValueError, match="input_features: input_ids hold audio placeholder tokens but no media"):
        m.embed(jnp.asarray(ids))  # placeholders without their media are refused at the entry points
    plain = m.embed(jnp.asarray(ids), validate=False)  # unchecked: placeholders are the pad embedding times the scale
    slots = ids == m.config.audio_token_id
    pad_row = m.embed_tokens[m.config.text.pad_token_id] * jnp.asarray(m.config.text.embed_scale, jnp.float32)
    np.testing.assert_allclose(np.asarray(plain)[slots], np.broadcast_to(np.asarray(pad_row), (slots.sum(),) + pad_row.shape))
    with_audio = m.embed(jnp.asarray(ids), input_features=s["input_features"], input_features_mask=s["input_features_mask"])
    feats = m.audio_features(s["input_features"])[np.asarray(s["input_features_mask"])]
    np.testing.assert_array_equal(np.asarray(with_audio)[slots], np.asarray(feats))


def test_wrong_patch_dim_is_named():
    m = model()
    with pytest.raises(ValueError, match=r"pixel_values: expected shape \[\?, \?, 6912\].*found \[1, 4, 768\]"):
        m.image_features(jnp.zeros((1, 4, 768)), jnp.zeros((1, 4, 2), jnp.int32))


def test_wrong_audio_frame_size_is_named():
    m = model()
    with pytest.raises(ValueError, match=r"input_features: expected shape \[\?, \?, 640\].*found \[1, 3, 320\]"):
        m.audio_features(jnp.zeros((1, 3, 320)))


def test_position_beyond_the_table_is_an_error():
    m = model()
    size = m.config.vision.mm_posemb_size
    pos = jnp.asarray([[[0, 0], [size, 1]]], jnp.int32)
    with pytest.raises(ValueError, match=rf"image_position_ids: coordinates must lie in \[0, {size}\)"):
        m.image_features(jnp.zeros((1, 2, 6912)), pos)


def test_placeholder_count_mismatch_says_both_numbers():
    m = model()
    s = split_batch(_inputs("mm_images_batch"), m.config)[0]
    ids = np.asarray(s["input_ids"]).copy()
    first = int(np.argmax(ids == m.config.image_token_id))
    ids[first] = 5  # one placeholder fewer than the valid patches
    n_valid = int(np.all(s["image_position_ids"] != -1, axis=-1).sum())
    with pytest.raises(ValueError, match=f"images: the sequence has {n_valid - 1} placeholder tokens but the inputs "
                                         f"give {n_valid} valid soft tokens"):
        m(jnp.asarray(ids), pixel_values=s["pixel_values"], image_position_ids=s["image_position_ids"])


def test_placeholder_count_mismatch_is_caught_under_jit():
    m = model()
    s = split_batch(_inputs("mm_audio"), m.config)[0]
    mask = np.asarray(s["input_features_mask"]).copy()
    mask[..., 0] = False  # one valid frame fewer than the placeholders
    f = eqx.filter_jit(lambda m, ids, x, mk: m(ids, input_features=x, input_features_mask=mk))
    with pytest.raises(Exception, match="audio: the number of placeholder tokens differs"):
        jax.block_until_ready(f(m, s["input_ids"], s["input_features"], jnp.asarray(mask)))


def test_mm_token_type_ids_of_the_wrong_length():
    m = model()
    ids = jnp.arange(3, 13)
    # under the tests' jaxtyping hook the annotation catches it first; without it, the model's own check
    # (check_shape: "mm_token_type_ids: expected shape [10] ..., found [9]") does
    with pytest.raises((ValueError, TypeError), match=r"mm_token_type_ids"):
        m(ids, mm_token_type_ids=jnp.zeros(9, jnp.int32))



def test_12b_multimodal_parameter_count():
    cfg = g4.Gemma4Config.gemma4_12b()
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0), dtype=jnp.bfloat16))
    assert g4.count_parameters(abstract.embed_vision) + g4.count_parameters(abstract.embed_audio) == 52_379_904
