"""Taps read the scanned stack's residual stream and attention probabilities exactly as a hand-unrolled run computes
them, patching a residual changes the logits exactly as recomputing with the patched value does, taps off leave the
program unchanged, and all of it works under jit, vmap and grad. fp64 throughout."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import gemma4_eqx as g4
from gemma4_eqx.model.masks import layer_masks
from gemma4_eqx.testing import filled_model

TIGHT = dict(rtol=1e-10, atol=1e-10)
SEQ = 12


def _draw(name, shape, rng):
    scale = 1.0 if ("norm" in name or "layer_scalar" in name) else 0.0
    return scale + 0.1 * rng.standard_normal(shape)


@pytest.fixture(scope="module")
def model():
    jax.config.update("jax_enable_x64", True)
    # 6 layers (5 sliding + 1 global), window 4 < SEQ so both mask rules matter
    cfg = g4.small_config(vocab_size=256, sliding_window=4, vision=False, audio=False)
    yield filled_model(cfg, _draw, seed=3, dtype=jnp.float64)
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(3, 250, SEQ), jnp.int32)


@pytest.fixture(scope="module")
def tapped():
    return eqx.filter_jit(lambda m, ids, taps: m(ids, taps=taps))


def _unrolled(model, ids, patches=None, adds=None):
    """Every layer one by one (no scan): (the input of each layer, the output of each layer, the logits)."""
    patches, adds = patches or {}, adds or {}
    h = model.embed(ids)
    slots = jnp.arange(ids.shape[0])
    masks = layer_masks(slots, slots, jnp.ones(ids.shape, bool), model.config.text.sliding_window)
    inputs, outputs = [], []
    for i in range(model.layers.num_layers):
        layer = model.layers.layer(i)
        inputs.append(h)
        h = layer(h, slots, masks[layer.kind])
        if i in patches:
            values, where = patches[i]
            h = jnp.where(where[:, None], values, h)
        if i in adds:
            values, where = adds[i]
            h = jnp.where(where[:, None], h + values, h)
        outputs.append(h)
    return inputs, outputs, model.logits_from_hidden(model.norm(h)), masks


def test_residuals_and_attention_equal_a_hand_unrolled_run(model, ids, tapped):
    taps = g4.Taps(residual=(4, 0, 5), attention=(1, 5))
    logits, got = tapped(model, ids, taps)
    inputs, outputs, expected_logits, masks = _unrolled(model, ids)
    assert got.residual.shape == (3, SEQ, model.config.text.hidden_size)
    for k, i in enumerate(taps.residual):
        np.testing.assert_allclose(np.asarray(got.residual[k]), np.asarray(outputs[i]), **TIGHT)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), **TIGHT)
    assert got.attention.shape == (2, model.config.text.num_attention_heads, SEQ, SEQ)
    for k, i in enumerate(taps.attention):
        layer = model.layers.layer(i)
        attn, mask = layer.self_attn, masks[layer.kind]
        p = got.attention[k]
        np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, **TIGHT)
        assert float(jnp.max(jnp.where(mask[None], 0.0, p))) == 0.0  # nothing outside the mask
        # they are the weights the layer used: weighting its values with them gives the layer's output
        x = layer.input_layernorm(inputs[i])
        _, v = attn.keys_values(x, jnp.arange(SEQ))
        group = attn.num_heads // attn.num_kv_heads
        out = jnp.einsum("hqk,khd->qhd", p, jnp.repeat(v, group, axis=1))
        out = attn.o_proj(out.reshape(SEQ, -1))
        np.testing.assert_allclose(np.asarray(out), np.asarray(attn(x, jnp.arange(SEQ), mask)), **TIGHT)


def test_logit_lens_of_the_last_layer_is_the_model_output(model, ids, tapped):
    logits, got = tapped(model, ids, g4.Taps(residual=(5,)))
    np.testing.assert_allclose(np.asarray(g4.taps.logit_lens(model, got.residual)[0]), np.asarray(logits), **TIGHT)


def test_patching_a_residual_equals_recomputing_with_it(model, ids, tapped):
    rng = np.random.default_rng(1)
    values = jnp.asarray(rng.standard_normal((2, SEQ, model.config.text.hidden_size)))
    where = jnp.asarray(rng.random((2, SEQ)) < 0.5)
    taps = g4.Taps(residual=(2, 4), patch=(2, 4), values=values, where=where)
    logits, got = tapped(model, ids, taps)
    _, outputs, expected, _ = _unrolled(model, ids, {2: (values[0], where[0]), 4: (values[1], where[1])})
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), **TIGHT)
    # a read at a patched layer sees the patched value
    np.testing.assert_allclose(np.asarray(got.residual), np.asarray(jnp.stack([outputs[2], outputs[4]])), **TIGHT)
    clean = model(ids)
    assert float(jnp.max(jnp.abs(logits - clean))) > 1e-3  # the patch did change something downstream


def test_adding_to_a_residual_equals_recomputing_with_it(model, ids, tapped):
    """`add` adds (steering), `patch` replaces; both in one call, values per position or one vector per layer,
    NumPy values accepted."""
    rng = np.random.default_rng(4)
    hidden = model.config.text.hidden_size
    vectors = rng.standard_normal((2, hidden))  # NumPy: one per written layer, the patched one first
    where = jnp.asarray(rng.random((2, SEQ)) < 0.6)
    taps = g4.Taps(residual=(1, 3), patch=(3,), add=(1,), values=vectors, where=where)
    logits, got = tapped(model, ids, taps)
    _, outputs, expected, _ = _unrolled(model, ids, patches={3: (vectors[0], where[0])},
                                        adds={1: (vectors[1], where[1])})
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), **TIGHT)
    np.testing.assert_allclose(np.asarray(got.residual), np.asarray(jnp.stack([outputs[1], outputs[3]])), **TIGHT)
    # per position, every position (where=None)
    per_position = jnp.asarray(rng.standard_normal((1, SEQ, hidden)))
    logits, _ = tapped(model, ids, g4.Taps(add=(4,), values=per_position))
    _, _, expected, _ = _unrolled(model, ids, adds={4: (per_position[0], jnp.ones(SEQ, bool))})
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), **TIGHT)
    with pytest.raises(ValueError, match=r"patch, add: layers \[2\] are in both"):
        g4.Taps(patch=(2,), add=(2, 3), values=vectors)


def _program(model, ids, call):
    """The jaxpr and the lowered StableHLO of `call(model, ids)` with the model's arrays as arguments."""
    params, static = eqx.partition(model, eqx.is_array)

    def fn(p, ids):
        return call(eqx.combine(p, static), ids)

    return str(jax.make_jaxpr(fn)(params, ids)), jax.jit(fn).lower(params, ids).as_text(debug_info=False)


def test_taps_off_leave_the_program_unchanged(model, ids):
    plain = _program(model, ids, lambda m, i: m(i))
    assert _program(model, ids, lambda m, i: m(i, taps=None)) == plain
    logits_only = lambda m, i: m(i, taps=g4.Taps())[0]  # nothing asked: the untapped program
    assert _program(model, ids, logits_only) == plain
    # the comparison can fail: a tap does change the program
    assert _program(model, ids, lambda m, i: m(i, taps=g4.Taps(residual=(1,)))[0]) != plain


def test_under_vmap(model, ids, tapped):
    rng = np.random.default_rng(2)
    batch = jnp.stack([ids, jnp.flip(ids)])
    values = jnp.asarray(rng.standard_normal((2, 1, SEQ, model.config.text.hidden_size)))
    where = jnp.zeros((2, 1, SEQ), bool).at[:, :, 3:6].set(True)
    taps = g4.Taps(residual=(0, 3), patch=(1,), values=values, where=where)  # batched values and where
    # jitted: one program (the eager vmap compiled one per primitive)
    vmapped = eqx.filter_jit(eqx.filter_vmap(lambda m, i, t: m(i, taps=t), in_axes=(None, 0, 0)))
    logits, got = vmapped(model, batch, taps)
    for b in range(2):
        one = g4.Taps(residual=(0, 3), patch=(1,), values=values[b], where=where[b])
        l1, g1 = tapped(model, batch[b], one)
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(l1), **TIGHT)
        np.testing.assert_allclose(np.asarray(got.residual[b]), np.asarray(g1.residual), **TIGHT)


def test_gradient_of_a_patch_matches_finite_differences(model, ids):
    m = model.with_remat(True)  # the backward pass recomputes each layer, taps included
    rng = np.random.default_rng(3)
    hidden = model.config.text.hidden_size
    where = jnp.zeros((1, SEQ), bool).at[0, 2:7].set(True)
    target = 17

    @jax.jit
    def score(values):
        logits, got = m(ids, taps=g4.Taps(residual=(3,), patch=(2,), values=values, where=where))
        return logits[-1, target] + 0.1 * jnp.sum(got.residual ** 2)

    values = jnp.asarray(rng.standard_normal((1, SEQ, hidden)))
    grad = jax.jit(jax.grad(score))(values)
    # positions that are not patched do not reach the output through the patch
    assert float(jnp.max(jnp.abs(jnp.where(where[..., None], 0.0, grad)))) == 0.0
    direction = jnp.asarray(rng.standard_normal(values.shape))
    eps = 1e-5
    numeric = (score(values + eps * direction) - score(values - eps * direction)) / (2 * eps)
    analytic = jnp.sum(grad * direction)
    assert abs(float(numeric - analytic)) <= 1e-6 * abs(float(analytic))


def test_bad_taps_are_named(model, ids):
    hidden = model.config.text.hidden_size
    with pytest.raises(ValueError, match=r"taps.residual: layers \[6\] do not exist"):
        model(ids, taps=g4.Taps(residual=(1, 6)))
    with pytest.raises(ValueError, match="residual: each layer may be listed once"):
        g4.Taps(residual=(1, 1))
    with pytest.raises((ValueError, TypeCheckError), match="attention"):
        g4.Taps(attention=(1.0,))
    with pytest.raises(ValueError, match="values: patching layers"):
        g4.Taps(patch=(1,))
    with pytest.raises((ValueError, TypeCheckError), match="values"):
        g4.Taps(patch=(1, 2), values=jnp.zeros((1, SEQ, hidden)))
    with pytest.raises(ValueError, match=r"taps.values: expected shape \[1, 12, 64\]"):
        model(ids, taps=g4.Taps(patch=(1,), values=jnp.zeros((1, SEQ + 1, hidden))))
    with pytest.raises(ValueError, match="taps.values: expected the activation dtype float64, found float32"):
        model(ids, taps=g4.Taps(patch=(1,), values=jnp.zeros((1, SEQ, hidden), jnp.float32)))
