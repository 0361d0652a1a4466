"""Sequence packing through the model: `segment_ids` confine attention to each segment (sliding and global layers,
image blocks included), positions restart at each segment start, and no position predicts across a boundary.

fp64, so "equal" means equal to rounding (<= 1e-10 relative)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import gemma4_eqx as g4
from gemma4_eqx.train import losses
from gemma4_eqx.testing import filled_model

TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _draw(name, shape, rng):
    scale = 1.0 if ("norm" in name or "layer_scalar" in name) else 0.0
    return scale + 0.1 * rng.standard_normal(shape)


@pytest.fixture(scope="module")
def model(x64):
    # window 4 < the sequences' lengths, so the sliding rule is exercised inside segments; 6 layers: 5 sliding + 1
    # global
    cfg = g4.small_config(vocab_size=256, sliding_window=4, audio=False)
    return filled_model(cfg, _draw, seed=7, dtype=jnp.float64)


@pytest.fixture(scope="module")
def forward():
    return eqx.filter_jit(lambda m, ids, kw: m(ids, **kw))


@pytest.fixture(scope="module")
def nll():
    return eqx.filter_jit(lambda m, ids, kw: g4.train.sequence_nll(m, ids, **kw))


def _image_prompt(cfg, n_soft, lead, tail, seed, *, close=True):
    """Text, `<boi>`, `n_soft` image soft tokens (one per raw patch), optionally `<eoi>`, text; with its media."""
    rng = np.random.default_rng(seed)
    ids = (list(lead) + [cfg.boi_token_id] + [cfg.image_token_id] * n_soft + ([cfg.eoi_token_id] if close else [])
           + list(tail))
    types = [1 if t == cfg.image_token_id else 0 for t in ids]
    pixels = rng.normal(size=(1, n_soft, cfg.vision.patch_dim))
    xy = np.stack([np.arange(n_soft), np.zeros(n_soft, int)], -1)[None].astype(np.int32)
    return np.asarray(ids, np.int32), {"mm_token_type_ids": np.asarray(types, np.int32), "pixel_values": pixels,
                                       "image_position_ids": xy}


def _as_jnp(d):
    return {k: jnp.asarray(v) for k, v in d.items()}


def test_segment_logits_equal_each_sequence_alone(model, forward):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 240, n).astype(np.int32) for n in (11, 8, 11)]
    (row,) = losses.pack_sequences(seqs, 30)
    seg = jnp.asarray(row["segment_ids"])
    # positions are derived from the segments when not given: 0, 1, ... from each segment start
    packed = forward(model, jnp.asarray(row["input_ids"]), {"segment_ids": seg})
    given = forward(model, jnp.asarray(row["input_ids"]),
                    {"segment_ids": seg, "positions": jnp.asarray(row["positions"])})
    np.testing.assert_allclose(np.asarray(packed), np.asarray(given), **TIGHT)
    at = 0
    for s in seqs:
        alone = forward(model, jnp.asarray(s), {})
        np.testing.assert_allclose(np.asarray(packed[at:at + len(s)]), np.asarray(alone), **TIGHT)
        at += len(s)
    # the check can fail: one segment over the whole row leaks the first sequence into the second
    leaky = forward(model, jnp.asarray(row["input_ids"]), {"segment_ids": jnp.ones_like(seg)})
    assert float(jnp.max(jnp.abs(leaky[11:19] - packed[11:19]))) > 1e-3


def test_segment_positions_restart():
    seg = jnp.asarray([1, 1, 1, 2, 2, 3, 0, 0])
    np.testing.assert_array_equal(np.asarray(g4.masks.segment_positions(seg)), [0, 1, 2, 0, 1, 0, 0, 1])


def test_packed_batch_loss_equals_the_sum_of_its_sequences(model, nll):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 240, n).astype(np.int32) for n in (7, 9, 7, 9, 7)]
    rows = losses.pack_sequences(seqs, 16)
    assert len(rows) == 3
    alone = [nll(model, jnp.asarray(s), {}) for s in seqs]
    total_alone = sum(float(t) for t, _ in alone)
    count_alone = sum(float(c) for _, c in alone)
    # the train path with segment_ids among the model's keywords (losses.packed_sequence_nll calls the same)
    batch = {k: jnp.stack([jnp.asarray(r[k]) for r in rows]) for k in ("input_ids", "segment_ids", "attention_mask")}
    loss = eqx.filter_jit(g4.train.batch_loss)(model, batch)
    assert abs(float(loss) - total_alone / count_alone) <= 1e-10 * total_alone / count_alone


def test_target_mask_does_not_predict_across_a_boundary(model):
    ids = jnp.asarray([5, 6, 7, 8, 9, 10])
    seg = jnp.asarray([1, 1, 2, 2, 2, 3])
    mask = g4.train.target_mask(ids, model.config, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(mask), [True, False, True, True, False])


@pytest.mark.parametrize("mask_mode", ["intended", "hf_forward"])
def test_packed_image_prompts_keep_their_soft_tokens_in_their_segment(model, forward, mask_mode):
    """Prompt A ends inside its image block and prompt B starts with image soft tokens, so the row holds one
    unbroken run of soft tokens across the boundary: each image block must still stay within its segment."""
    cfg = model.config
    a_ids, a_media = _image_prompt(cfg, 3, [5, 6], [], seed=2, close=False)
    b_ids, b_media = _image_prompt(cfg, 3, [], [7, 8, 9, 10], seed=3)
    b_ids, b_types = b_ids[1:], b_media["mm_token_type_ids"][1:]  # B starts with the soft tokens themselves
    b_media = dict(b_media, mm_token_type_ids=b_types)
    text = np.arange(20, 27, dtype=np.int32)
    extras = [{"mm_token_type_ids": np.zeros(len(text), np.int32)}, a_media, b_media]
    (row,) = losses.pack_sequences([text, a_ids, b_ids], 24, extras=extras)
    assert row["pixel_values"].shape[0] == 2
    types = row["mm_token_type_ids"]
    at_a, at_b = len(text), len(text) + len(a_ids)
    assert types[at_b - 1] == types[at_b] == 1  # one run of soft tokens across the A | B boundary
    row = _as_jnp(row)
    kw = {k: row[k] for k in ("segment_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                              "image_position_ids")}
    packed = forward(model, row["input_ids"], dict(kw, mask_mode=mask_mode))
    for ids, media, at in ((a_ids, a_media, at_a), (b_ids, b_media, at_b)):
        alone = forward(model, jnp.asarray(ids), dict(_as_jnp(media), mask_mode=mask_mode))
        np.testing.assert_allclose(np.asarray(packed[at:at + len(ids)]), np.asarray(alone), **TIGHT)


def test_segments_must_be_contiguous(model, forward):
    ids = jnp.arange(5, 11)
    with pytest.raises(ValueError, match="segment_ids: each segment must be one contiguous run.*id 1"):
        model(ids, segment_ids=jnp.asarray([1, 1, 2, 2, 1, 1]))
    # (under the tests' shape checks jaxtyping names the parameter first)
    with pytest.raises((ValueError, TypeCheckError), match=r"segment_ids"):
        model(ids, segment_ids=jnp.asarray([1, 1, 2]))
    with pytest.raises((ValueError, TypeCheckError), match="segment_ids"):
        model(ids, segment_ids=jnp.ones(6))
    # under jit the check runs with the program (the shape of the logits test: its compiled program is reused)
    broken = jnp.asarray([1] * 10 + [2] * 10 + [1] * 10)
    with pytest.raises(Exception, match="segment_ids: each segment must be one contiguous run"):
        forward(model, jnp.arange(5, 35), {"segment_ids": broken})
