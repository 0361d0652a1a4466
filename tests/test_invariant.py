"""numerics="invariant": a token's numbers do not depend on the shape of the call that computes them.

Cached decoding (one query over a ring buffer and a partly empty cache) must equal the no-cache forward over the
same tokens bit for bit, and a chunked prefill a whole one; the kernels it is built from are checked on their own
(ordered attention against the einsum attention, row-at-a-time matmul against XLA's), including the shapes where
XLA's own kernels are shown to round differently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.layers.attention import banded_attention, dot_product_attention, ordered_attention
from gemma4_eqx.layers.linear import rowwise_matmul

import hf_reference as ref
from test_generation import _greedy_with_cache, _recompute, _samples, model


def _qkv(seed, t, heads, kv_heads, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(r.standard_normal(shape), dtype)
    return make(t, heads, d), make(t, kv_heads, d), make(t, kv_heads, d)


def _window_mask(t, window):
    i = jnp.arange(t)
    return (i[:, None] >= i[None]) & (i[:, None] - i[None] < window)


def test_ordered_attention_is_dot_product_attention():
    with jax.enable_x64(True):
        q, k, v = _qkv(0, 23, 4, 2, 16, jnp.float64)
        mask = _window_mask(23, 8).at[3].set(False)  # a fully masked row comes out uniform in both
        a, b = ordered_attention(q, k, v, mask), dot_product_attention(q, k, v, mask)
        assert np.abs(np.asarray(a - b)).max() <= 1e-13
    q, k, v = _qkv(1, 23, 4, 1, 32)
    mask = _window_mask(23, 23)
    assert np.abs(np.asarray(ordered_attention(q, k, v, mask) - dot_product_attention(q, k, v, mask))).max() <= 1e-5


def test_ordered_attention_rounds_the_same_in_a_decode_layout():
    """One query over [ring of 8 slots, oldest first, the first one stale; itself] equals the same query's row
    of a 13-token forward, where XLA's einsum scores do not (the reason the scores are summed by component)."""
    q, k, v = _qkv(2, 13, 4, 2, 16)
    full_mask = _window_mask(13, 8)
    full = jax.jit(ordered_attention)(q, k, v, full_mask)
    ring_mask = jnp.concatenate([jnp.array([False]), jnp.ones(8, bool)])[None]
    step = jax.jit(ordered_attention)(q[12:], k[4:], v[4:], ring_mask)
    assert np.array_equal(np.asarray(step[0]), np.asarray(full[12]))
    banded = jax.jit(lambda *a: banded_attention(*a, 8, kernel=ordered_attention))
    q, k, v = _qkv(3, 40, 4, 2, 16)
    mask = _window_mask(40, 8)
    assert np.array_equal(np.asarray(banded(q, k, v, mask)), np.asarray(jax.jit(ordered_attention)(q, k, v, mask)))

    scores = jax.jit(lambda a, b: jnp.einsum("tkgd,skd->kgts", a.reshape(a.shape[0], 2, 2, 16), b))
    differs = [s for s in range(1, 14)
               if not np.array_equal(np.asarray(scores(q[12:13], k[13 - s:13]))[..., 0, :],
                                     np.asarray(scores(q[:13], k[:13]))[..., 12, 13 - s:])]
    assert differs, "XLA's einsum scores no longer depend on the shape; the per-component sum could go"


def test_rowwise_matmul_rows_do_not_depend_on_the_row_count():
    r = np.random.default_rng(4)
    w = jnp.asarray(r.standard_normal((64, 32)), jnp.float32)
    x = jnp.asarray(r.standard_normal((80, 64)), jnp.float32)
    many = jax.jit(rowwise_matmul)(x, w)
    for rows in (1, 7, 64):
        assert np.array_equal(np.asarray(jax.jit(rowwise_matmul)(x[:rows], w)), np.asarray(many[:rows]))
    assert np.abs(np.asarray(many - x @ w)).max() <= 1e-4
    # XLA's own matmul switches kernels with the row count: row 0 of a 64-row product differs from a 1-row one.
    plain = jax.jit(jnp.matmul)
    assert not np.array_equal(np.asarray(plain(x[:64], w)[0]), np.asarray(plain(x[:1], w)[0]))


@functools.lru_cache(maxsize=None)
def invariant_model(dtype: str):
    return g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.dtype(dtype)).with_numerics("invariant")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case_name", ["gen_text", "gen_image", "gen_left_pad"])
def test_cached_decoding_equals_recomputation_bit_for_bit(case_name, dtype):
    """60 greedy steps, sliding window 8 (the ring wraps 7 times): every step's logits identical.

    The decode steps get the model as an argument (`decode_step_jitted`), the recomputation closes over it
    (`_recompute`), so XLA sees the weights as parameters in one and as constants in the other: that must not
    matter either.
    """
    m = invariant_model(dtype)
    for sample in _samples("tiny_a", case_name):
        stepped = _greedy_with_cache(m, dict(sample), 60)
        again = _recompute(m, sample, stepped.argmax(-1))
        assert np.array_equal(stepped, again)


def test_video_prompt_and_chunked_prefill_are_bit_exact():
    m = model("tiny_a").with_numerics("invariant")
    (sample,) = _samples("tiny_a", "mm_video")[:1]
    stepped = _greedy_with_cache(m, dict(sample), 12)
    assert np.array_equal(stepped, _recompute(m, sample, stepped.argmax(-1)))
    (sample,) = _samples("tiny_a", "gen_text")
    ids = sample["input_ids"]
    fresh = lambda: g4.KVCache.init(m.config, max_len=ids.shape[0] + 4, dtype=m.dtype)
    whole, _ = m.prefill(ids, fresh())
    for chunk in (3, 7):
        cache = fresh()
        for start in range(0, ids.shape[0], chunk):
            logits, cache = m.prefill(ids[start:start + chunk], cache)
        assert np.array_equal(np.asarray(logits), np.asarray(whole))


def test_invariant_numerics_needs_the_xla_attention():
    m = model("tiny_a")
    with pytest.raises(ValueError, match="numerics='invariant'.*implementation 'xla', found 'cudnn'"):
        m.with_attention_implementation("cudnn").with_numerics("invariant")
    with pytest.raises(ValueError, match="numerics='invariant'.*found 'auto'"):
        m.with_numerics("invariant").with_attention_implementation("auto")
    with pytest.raises(ValueError, match="numerics='invariant'"):
        g4.load(ref.checkpoint_dir("tiny_a"), numerics="invariant", attention_implementation="cudnn")
