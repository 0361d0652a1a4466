"""`g4.serving_layout`: every layer in its own arrays, the same model (forward, cached decode, generate)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4


@pytest.fixture(scope="module")
def models():
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    return model, g4.serving_layout(model)


def test_layout_is_per_layer_and_keeps_the_weights(models):
    model, served = models
    stack = served.layers
    assert stack.num_repeats == 1 and stack.unroll and len(stack.runs) == model.layers.num_layers
    assert all(length == 1 for _, length in stack.pattern)
    for i in range(model.layers.num_layers):
        a, b = model.layers.layer(i), stack.layer(i)
        assert b.kind == a.kind
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_forward_prefill_and_decode_match_the_stored_layout(models):
    model, served = models
    ids = np.random.default_rng(0).integers(3, model.config.text.vocab_size - 8, size=21).astype(np.int32)
    np.testing.assert_allclose(served(ids), model(ids), atol=2e-5, rtol=0)
    cache = g4.KVCache.init(model.config, max_len=32, dtype=jnp.float32)
    ref_logits, ref_cache = model.prefill(ids[:-1], cache)
    logits, stock_cache = served.prefill(ids[:-1], cache)  # a stock cache: gathered and scattered per call
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    own = served.layers.own_cache_layout(stock_cache.layers)
    assert served.layers.holds_own_layout(own) and not served.layers.holds_own_layout(stock_cache.layers)
    assert served.layers.own_cache_layout(own) is own
    ref_step, _ = model.decode_step(jnp.asarray(ids[-1]), ref_cache)
    step_stock, _ = served.decode_step(jnp.asarray(ids[-1]), stock_cache)
    step_own, own_after = served.decode_step(jnp.asarray(ids[-1]), eqx.tree_at(lambda c: c.layers, stock_cache, own))
    np.testing.assert_allclose(step_stock, ref_step, atol=2e-5, rtol=0)
    np.testing.assert_allclose(step_own, ref_step, atol=2e-5, rtol=0)
    assert served.layers.holds_own_layout(own_after.layers)  # the cache stays in the serving layout


def test_generate_gives_the_same_tokens(models):
    model, served = models
    ids = np.random.default_rng(1).integers(3, model.config.text.vocab_size - 8, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False
    kw = dict(max_new_tokens=12, temperature=0.0, stop_ids=(), attention_mask=mask, return_result=True,
              return_logprobs=True)
    ref = g4.generate(model, ids, **kw)
    out = g4.generate(served, ids, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4, rtol=0)
