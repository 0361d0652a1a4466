"""Cached decoding equals recomputation without a cache (60 steps with the ring wrapping, video, K and V against raw
keys, fp64). Split from test_generation.py so that the suite's two workers share its cost; the helpers live there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.model.cache import FullKV, RawKeyKV, cache_bytes

import hf_reference as ref
from test_generation import CACHE_SLOTS, _greedy_with_cache, _recompute, _samples, model


@pytest.mark.parametrize("case_name", ["gen_text", "gen_image", "gen_left_pad"])
def test_cached_decoding_equals_recomputation_over_60_steps(case_name):
    """tiny_a has sliding_window 8: over 60 steps the ring buffer wraps many times.

    In fp32 the reference itself is only defined to rounding: XLA's CPU row reductions (RMSNorm means, softmax
    sums) round differently depending on how many rows they reduce, so the no-cache forward over prompt + 60
    tokens differs from the no-cache forward over prompt + 30 tokens at the same positions by up to 1.2e-5 on
    these logits of size ~20 (measured). The cache must be within 1e-5 of the recomputation or, where the
    reference's own floor is above that, within 1.5x of it (measured max 1.35e-5 against a floor of 1.19e-5);
    the fp64 test below shows the two computations are the same to 1e-12, and under `numerics="invariant"` the
    two are bit-identical in fp32 (tests/test_invariant.py).
    """
    m = model("tiny_a")
    assert m.config.text.sliding_window == 8
    for sample in _samples("tiny_a", case_name):
        stepped = _greedy_with_cache(m, dict(sample), 60)
        tokens = stepped.argmax(-1)
        again = _recompute(m, sample, tokens)
        floor = np.abs(_recompute(m, sample, tokens[:30]) - again[:30]).max()
        error = np.abs(stepped - again).max()
        assert error <= max(1e-5, 1.5 * floor) and error <= 2e-5, f"cache {error:.3g}, reference floor {floor:.3g}"


def test_video_prompt_cached_decoding_equals_recomputation():
    """A video prompt (3 frames, each its own bidirectional block on the sliding layers) through prefill + 20
    decode steps, and through `generate`, against the no-cache forward over the same tokens."""
    m = model("tiny_a")
    (sample,) = _samples("tiny_a", "mm_video")[:1]
    assert "pixel_values_videos" in sample and (np.asarray(sample["mm_token_type_ids"]) == 2).sum() > 0
    stepped = _greedy_with_cache(m, dict(sample), 20)
    tokens = stepped.argmax(-1)
    again = _recompute(m, sample, tokens)
    assert np.abs(stepped - again).max() <= 2e-5
    prompt = dict(sample)
    ids = prompt.pop("input_ids")
    generated = g4.generate(m, ids, max_new_tokens=20, temperature=0.0, stop_ids=(), suppress_ids=(), **prompt)
    assert np.array_equal(np.asarray(generated), tokens)


def test_k_and_v_in_the_cache_equal_raw_keys():
    """`raw_keys=False` stores the keys-as-values layers' finished K and V: same tokens, logits equal to rounding
    (fp32) and to 1e-12 in fp64; twice those layers' bytes."""
    m = model("tiny_a")
    (sample,) = _samples("tiny_a", "gen_image")[:1]
    prompt = dict(sample)
    ids = prompt.pop("input_ids")
    kw = dict(max_new_tokens=24, temperature=0.0, stop_ids=(), suppress_ids=())
    raw = g4.generate(m, ids, **kw, **prompt)
    separate = g4.generate(m, ids, cache_raw_keys=False, **kw, **prompt)
    assert np.array_equal(np.asarray(raw), np.asarray(separate))
    with jax.enable_x64(True):
        m64 = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        # the capacity of the fp64 test below: the raw-key cache reuses its compiled prefill and decode step
        caches = [g4.KVCache.init(m64.config, max_len=CACHE_SLOTS, dtype=jnp.float64, raw_keys=r)
                  for r in (True, False)]
        assert isinstance(caches[0].layers[-1], RawKeyKV) and isinstance(caches[1].layers[-1], FullKV)
        out = []
        for cache in caches:
            logits, cache = m64.prefill(ids, cache, **prompt)
            steps = [logits]
            for token in np.asarray(raw)[:7]:
                logits, cache = m64.decode_step(jnp.int32(token), cache)
                steps.append(logits)
            out.append(np.stack([np.asarray(x) for x in steps]))
        assert np.abs(out[0] - out[1]).max() <= 1e-12
    cfg = m.config
    full = sum(t == "full_attention" for t in cfg.text.layer_types)
    extra = full * 100 * cfg.text.global_head_dim * 4  # one more [slots, 1, head_dim] fp32 tensor per global layer
    assert cache_bytes(cfg, 100, jnp.float32, raw_keys=False) - cache_bytes(cfg, 100, jnp.float32) == extra


def test_cached_decoding_is_exact_in_float64():
    with jax.enable_x64(True):
        m = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        for case_name in ("gen_image", "gen_left_pad"):
            for sample in _samples("tiny_a", case_name):
                stepped = _greedy_with_cache(m, dict(sample), 40)
                again = _recompute(m, sample, stepped.argmax(-1))
                assert np.abs(stepped - again).max() <= 1e-12
