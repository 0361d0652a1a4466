"""`g4.serving_layout`: every layer in its own arrays, the same model (forward, cached decode, generate)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.layers.mlp import MLP, FusedMLP


@pytest.fixture(scope="module")
def models():
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    return model, g4.serving_layout(model)


def test_layout_is_per_layer_and_keeps_the_weights(models):
    model, served = models
    stack = served.layers
    assert stack.num_repeats == 1 and stack.unroll and len(stack.runs) == model.layers.num_layers
    assert all(length == 1 for _, length in stack.pattern)
    unfused = g4.serving_layout(model, fuse_mlp=False).layers
    for i in range(model.layers.num_layers):
        a, b, c = model.layers.layer(i), stack.layer(i), unfused.layer(i)
        assert b.kind == a.kind == c.kind
        assert type(c.mlp) is MLP and type(b.mlp) is FusedMLP
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for name in ("gate_proj", "up_proj", "down_proj"):  # the fused MLP's views are the stored projections
            np.testing.assert_array_equal(np.asarray(getattr(b.mlp, name).weight), np.asarray(getattr(a.mlp, name).weight))
        np.testing.assert_array_equal(np.asarray(b.self_attn.q_proj.weight), np.asarray(a.self_attn.q_proj.weight))


def test_a_fused_serving_layout_saves_the_stored_tensors(models, tmp_path):
    model, served = models
    g4.save(served, tmp_path / "served")
    back = g4.load(tmp_path / "served")
    for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fusing_an_adapted_or_quantized_mlp_leaves_it_as_it_is(models):
    model, _ = models
    lora = g4.serving_layout(g4.surgery.add_lora(model, rank=2, targets=("up_proj",), key=jax.random.key(0)))
    assert all(type(lora.layers.layer(i).mlp) is MLP for i in range(model.layers.num_layers))
    with pytest.raises(TypeError, match="plain Linear"):
        FusedMLP.of(g4.surgery.add_lora(model, rank=2, targets=("gate_proj",), key=jax.random.key(0)).layers.layer(0).mlp)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_the_serving_layout_quantizes_the_fused_mlp_as_the_stored_one(models, mode):
    """`g4.quantize` of a serving layout (what a quantized `g4.load(..., layout="serving")` model is) quantizes the
    fused gate/up weight: its halves are the stored projections quantized alone, and it generates the same."""
    model, served = models
    qm, qs = g4.quantize(model, mode), g4.quantize(served, mode)
    fused, alone = qs.layers.layer(0).mlp, qm.layers.layer(0).mlp
    assert type(fused) is FusedMLP and fused.intermediate_size == model.config.text.intermediate_size
    for name in ("gate_proj", "up_proj"):
        for x, y in zip(jax.tree.leaves(getattr(fused, name)), jax.tree.leaves(getattr(alone, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ids = np.random.default_rng(2).integers(3, model.config.text.vocab_size - 8, size=(1, 10)).astype(np.int32)
    kw = dict(max_new_tokens=8, temperature=0.0, stop_ids=())
    np.testing.assert_array_equal(np.asarray(g4.generate(qs, ids, **kw)), np.asarray(g4.generate(qm, ids, **kw)))


def test_forward_prefill_and_decode_match_the_stored_layout(models):
    model, served = models
    ids = np.random.default_rng(0).integers(3, model.config.text.vocab_size - 8, size=21).astype(np.int32)
    forward = eqx.filter_jit(lambda m, ids: m(ids))  # one program per layout instead of op-by-op dispatch
    np.testing.assert_allclose(forward(served, ids), forward(model, ids), atol=2e-5, rtol=0)
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


def test_load_straight_into_the_serving_layout():
    """`g4.load(..., layout="serving")` (what the CLI, the chat command and the server use) is the serving layout of
    the stored model, made without keeping the stacked arrays; an unknown layout is refused by name."""
    stored = g4.load(g4.assets.TINY_CHECKPOINT)
    served = g4.load(g4.assets.TINY_CHECKPOINT, layout="serving")
    assert bool(eqx.tree_equal(served, g4.serving_layout(stored)))
    copy = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, stored)
    assert bool(eqx.tree_equal(g4.serving_layout(copy, consume=True), served))
    assert any(x.is_deleted() for x in jax.tree.leaves(eqx.filter(copy, eqx.is_array)))
    with pytest.raises(ValueError, match="layout: expected one of"):
        g4.load(g4.assets.TINY_CHECKPOINT, layout="fast")
