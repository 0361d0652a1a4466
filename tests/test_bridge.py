"""The NNX <-> Equinox bridge: every parameter carried over, bit for bit, in both directions."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma4_eqx as g4
from gemma4_eqx import bridge
from gemma4_eqx import nnx as g4nnx
from gemma4_eqx.testing import filled_model


def random_equinox(cfg: g4.Gemma4Config, dtype, seed: int = 0) -> g4.Gemma4:
    """Every leaf a distinct random array, so a swapped or misplaced tensor cannot go unnoticed."""
    return filled_model(cfg, lambda name, shape, rng: 0.1 * rng.standard_normal(shape), seed=seed, dtype=dtype)


def random_nnx(cfg: g4.Gemma4Config, seed: int = 0) -> g4nnx.Gemma4NNX:
    """Built abstractly, then every parameter set to a distinct random array."""
    rng = np.random.default_rng(seed)
    ref = nnx.eval_shape(lambda: g4nnx.Gemma4NNX(cfg, rngs=nnx.Rngs(seed)))
    for param in g4nnx.named_params(ref).values():
        value = param.get_value()
        param.set_value(jnp.asarray(rng.standard_normal(value.shape).astype(np.float32) * 0.1, value.dtype))
    return ref


def assert_bitwise_equal(a: g4.Gemma4, b: g4.Gemma4) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def assert_same_params(a: g4nnx.Gemma4NNX, b: g4nnx.Gemma4NNX) -> None:
    pa, pb = g4nnx.named_params(a), g4nnx.named_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        x, y = pa[name][...], pb[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), name


@pytest.fixture(scope="module")
def cfg():
    return g4.small_config()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_equinox_nnx_equinox_round_trip_is_bitwise(cfg, dtype):
    model = random_equinox(cfg, dtype)
    ref = bridge.to_nnx(model)
    assert ref.dtype == dtype
    assert_bitwise_equal(bridge.from_nnx(ref), model)


def test_nnx_equinox_nnx_round_trip_is_bitwise(cfg):
    ref = random_nnx(cfg, seed=3)
    assert_same_params(bridge.to_nnx(bridge.from_nnx(ref)), ref)


def test_each_nnx_layer_lands_in_its_stack_slot(cfg):
    """Layer i of NNX is `DecoderStack.layer(i)` of Equinox (runs of 5 sliding + 1 full, stacked per repeat)."""
    cfg = g4.small_config(num_hidden_layers=12)
    model = random_equinox(cfg, jnp.float32, seed=4)
    ref = bridge.to_nnx(model)
    for i in (0, 4, 5, 6, 11):
        layer = model.layers.layer(i)
        np.testing.assert_array_equal(ref.layers[i].self_attn.q_proj.kernel[...], layer.self_attn.q_proj.weight)
        np.testing.assert_array_equal(ref.layers[i].layer_scalar[...], layer.layer_scalar)
        np.testing.assert_array_equal(ref.layers[i].post_feedforward_layernorm.weight[...],
                                      layer.post_feedforward_layernorm.weight)


def test_from_nnx_passes_model_options(cfg):
    model = bridge.from_nnx(random_nnx(cfg), remat=True)
    assert model.layers.remat


def test_wrong_shape_names_the_tensor(cfg):
    ref = random_nnx(cfg)
    ref.layers[5].self_attn.k_proj.kernel.set_value(jnp.zeros((64, 64)))
    with pytest.raises(ValueError, match=r"model\.language_model\.layers\.5\.self_attn\.k_proj\.weight: the Equinox "
                                         r"model expects \(64, 32\) float32, the NNX model holds \(64, 64\)"):
        bridge.from_nnx(ref)


def test_models_through_the_bridge_equal_models_loaded_directly(cfg, tmp_path):
    g4.save(random_equinox(cfg, jnp.float32, seed=5), tmp_path)
    direct_eqx, direct_nnx = g4.load(tmp_path), g4nnx.load(tmp_path)
    via_eqx, via_nnx = bridge.from_nnx(direct_nnx), bridge.to_nnx(direct_eqx)
    assert_bitwise_equal(via_eqx, direct_eqx)
    assert_same_params(via_nnx, direct_nnx)

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 20)), jnp.int32)
    # jit keys its cache on whether the input arrays are committed to a device: loaded models' are, bridged ones'
    # are not. Committed alike, both models of a pair run the same compiled program.
    committed = lambda model: jax.device_put(model, jax.devices()[0])
    eqx_logits = eqx.filter_jit(lambda m, ids: jax.vmap(m)(ids))
    nnx_logits = nnx.jit(lambda r, ids: r.logits(ids))
    assert np.array_equal(eqx_logits(committed(via_eqx), ids), eqx_logits(committed(direct_eqx), ids))
    assert np.array_equal(nnx_logits(committed(via_nnx), ids), nnx_logits(committed(direct_nnx), ids))
