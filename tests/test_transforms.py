"""Functional transforms over the whole model: vmap == loop, grad == finite differences (fp64), remat, per-example
gradients, jvp. Media included: the vision and audio embedders are differentiated along with the decoder."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx import train
from gemma4_eqx.assets import TINY_CHECKPOINT
from gemma4_eqx.generate.batching import stack_samples


# ---- inputs shared with test_surgery.py / test_train.py --------------------------------------------
def multimodal_sample(config, seed: int, *, image_tokens: int = 0, audio_tokens: int = 0, text: int = 6,
                      patches: int | None = None, frames: int | None = None, pad: int = 0) -> dict[str, np.ndarray]:
    """`[pad] bos text <boi> image.. <eoi> text <boa> audio.. <eoa> text`, with its media (numpy, one sample).

    `patches` / `frames` >= the soft-token counts add padding patches (-1, -1) / masked audio frames.
    """
    rng = np.random.default_rng(seed)
    words = lambda n: list(rng.integers(3, config.text.vocab_size - 8, n))
    ids, types = [config.text.pad_token_id] * pad + [config.text.bos_token_id] + words(text), [0] * (pad + 1 + text)
    sample: dict[str, np.ndarray] = {}
    if image_tokens:
        ids += [config.boi_token_id] + [config.image_token_id] * image_tokens + [config.eoi_token_id] + words(text)
        types += [0] + [1] * image_tokens + [0] * (1 + text)
        n = patches or image_tokens
        v = config.vision
        pos = np.full((1, n, 2), -1, np.int32)
        pos[0, :image_tokens] = np.stack(np.divmod(np.arange(image_tokens), 3), -1)[:, ::-1]
        sample["pixel_values"] = rng.uniform(-1, 1, (1, n, v.patch_dim)).astype(np.float32)
        sample["image_position_ids"] = pos
    if audio_tokens:
        ids += [config.boa_token_id] + [config.audio_token_id] * audio_tokens + [config.eoa_token_id] + words(text)
        types += [0] + [3] * audio_tokens + [0] * (1 + text)
        n = frames or audio_tokens
        sample["input_features"] = (0.1 * rng.standard_normal((1, n, config.audio.audio_embed_dim))).astype(np.float32)
        sample["input_features_mask"] = np.arange(n)[None] < audio_tokens
    real = np.arange(len(ids)) >= pad
    sample.update(input_ids=np.asarray(ids, np.int32), mm_token_type_ids=np.asarray(types, np.int32),
                  attention_mask=real, positions=np.maximum(np.cumsum(real) - 1, 0).astype(np.int32))
    return sample


def mixed_batch(config) -> list[dict[str, np.ndarray]]:
    """Three samples of one length: image + audio, image only (with padding patches), audio only, left-padded."""
    kinds = [dict(image_tokens=4, patches=7, audio_tokens=3, frames=6), dict(image_tokens=5, patches=7),
             dict(audio_tokens=5, frames=6)]  # stack_samples pads the item count, not patches per item
    lengths = [len(multimodal_sample(config, k, **kw)["input_ids"]) for k, kw in enumerate(kinds)]
    return [multimodal_sample(config, k, pad=max(lengths) - n, **kw) for k, (kw, n) in enumerate(zip(kinds, lengths))]


def as_jax(sample, dtype=jnp.float32):
    return {k: jnp.asarray(v, dtype) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v)
            for k, v in sample.items()}


def random_tangent(model, seed: int):
    """A direction in parameter space: N(0, 1) in every floating leaf, drawn with numpy (as one jitted
    jax.random program it took 16 s to compile, for a handful of directions)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                        eqx.filter(model, eqx.is_inexact_array))


def tree_max_diff(a, b) -> float:
    """Largest absolute difference over all leaves (in numpy: eager jnp would compile a kernel per shape)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_max(a) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(a))


@functools.lru_cache(maxsize=None)
def model32():
    """The bundled small checkpoint (6 layers, vision and audio; loads without compiling anything)."""
    return g4.load(TINY_CHECKPOINT, dtype=jnp.float32)


CONFIG = model32().config


forward = eqx.filter_jit(lambda m, s: (m(**s), train.sequence_loss(m, s)))
batched_forward = eqx.filter_jit(jax.vmap(lambda m, s: (m(**s), train.sequence_loss(m, s)), in_axes=(None, 0)))
grad = eqx.filter_jit(eqx.filter_grad(train.sequence_loss))


def row(batch, b):
    # sliced in numpy: eager indexing compiles a slice program per leaf shape
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[b]), batch)


# ---- vmap == loop ------------------------------------------------------------------------------------
def test_vmap_over_a_left_padded_text_batch_equals_a_loop():
    m = model32()
    samples = [multimodal_sample(CONFIG, s, text=12 - s, pad=s) for s in range(3)]
    logits, losses = batched_forward(m, as_jax(stack_samples(samples)))
    for b, s in enumerate(samples):
        one, one_loss = forward(m, as_jax(s))
        real = s["attention_mask"]
        np.testing.assert_allclose(logits[b][real], one[real], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(losses[b], one_loss, rtol=1e-5)


def test_vmap_over_a_multimodal_batch_equals_a_loop():
    """Samples with different media (image + audio, image only, audio only), padded to common shapes by
    `stack_samples` (all-padding items are dropped by the splice, so no sample's result may change)."""
    m = model32()
    samples = mixed_batch(CONFIG)
    batch = as_jax(stack_samples(samples))
    assert batch["pixel_values"].shape[:3] == (3, 1, 7) and batch["input_features"].shape[:3] == (3, 1, 6)
    logits, losses = batched_forward(m, batch)
    for b, s in enumerate(samples):
        one, one_loss = forward(m, as_jax(s))  # the sample's own media, unpadded
        real = s["attention_mask"]
        # fp32, kernels chosen per shape: 2.1e-5 measured on an Intel Xeon with AVX512-BF16 (2026-12-07, at the
        # commit before as well), <= 2e-5 on the AMD EPYC hosts
        np.testing.assert_allclose(logits[b][real], one[real], atol=4e-5, rtol=1e-5)
        np.testing.assert_allclose(losses[b], one_loss, rtol=1e-5)


# ---- gradients -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mm_batch():
    return as_jax(stack_samples(mixed_batch(CONFIG)))


def test_grads_of_the_whole_multimodal_model_are_finite_and_reach_the_embedders(mm_batch):
    g = grad(model32(), row(mm_batch, 0))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    for name, part in [("vision", g.embed_vision), ("audio", g.embed_audio), ("decoder", g.layers),
                       ("tokens", g.embed_tokens)]:
        assert tree_max(part) > 0, f"no gradient reaches the {name} parameters"
    assert tree_max(g.embed_vision.pos_embedding) > 0 and tree_max(g.embed_vision.patch_dense) > 0


@pytest.fixture(scope="module")
def fp64(mm_batch):
    """The model and a multimodal sample in float64, the loss and its gradient (computed inside enable_x64).

    The fixture returns outside the enable_x64 block (each test enters its own), so that the later fp32 tests of
    the module keep running without x64 and reuse the fp32 programs compiled before this fixture.
    """
    with jax.enable_x64(True):
        to64 = lambda x: jnp.asarray(np.asarray(x, np.float64)) if eqx.is_inexact_array(x) else x  # numpy cast
        m, s = jax.tree.map(to64, model32()), jax.tree.map(to64, row(mm_batch, 0))
        # one compiled function for the loss and its gradient; the sample is an argument, not a baked-in constant
        value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(train.sequence_loss))
        f = lambda m: value_and_grad(m, s)[0]
        g = value_and_grad(m, s)[1]
    return m, s, f, g


def _shifted(m, v, eps):
    """m + eps v and m - eps v, added in numpy (fp64): no program per leaf shape to compile."""
    params, static = eqx.partition(m, eqx.is_inexact_array)
    shift = lambda sign: eqx.combine(
        jax.tree.map(lambda p, t: jnp.asarray(np.asarray(p) + sign * eps * np.asarray(t)), params, v), static)
    return shift(1.0), shift(-1.0)


def _central_difference(f, m, v, eps):
    plus, minus = _shifted(m, v, eps)
    return (f(plus) - f(minus)) / (2 * eps)


def _dot(a, b) -> float:
    """<a, b> over all leaves, in numpy fp64."""
    return float(sum(np.vdot(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


# Central differences with eps = 1e-7 along N(0, 1) directions: truncation ~eps^2 and rounding ~1e-16/eps,
# measured relative errors 5e-11 .. 6e-10 on these directions.
EPS, RTOL = 1e-7, 1e-7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp64_grad_matches_finite_differences_along_random_directions(fp64, seed):
    """All parameters at once: decoder, token embedding, vision and audio embedders."""
    with jax.enable_x64(True):
        m, s, f, g = fp64
        assert f(m).dtype == jnp.float64 and all(x.dtype == jnp.float64 for x in jax.tree.leaves(g))
        v = random_tangent(m, seed)
        analytic = _dot(g, v)
        numeric = float(_central_difference(f, m, v, EPS))
        assert abs(analytic - numeric) <= RTOL * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("part", ["embed_vision", "embed_audio"])
def test_fp64_grad_of_each_embedder_matches_finite_differences(fp64, part):
    with jax.enable_x64(True):
        m, s, f, g = fp64
        v = random_tangent(m, 7)
        keep = jax.tree.map(lambda _: False, v)
        keep = eqx.tree_at(lambda t: getattr(t, part), keep, replace_fn=lambda sub: jax.tree.map(lambda _: True, sub))
        v = jax.tree.map(lambda t, k: t if k else jnp.asarray(np.zeros(t.shape, t.dtype)), v, keep)
        analytic = _dot(g, v)
        numeric = float(_central_difference(f, m, v, EPS))
        assert abs(analytic) > 1e-6
        assert abs(analytic - numeric) <= RTOL * abs(numeric), (analytic, numeric)


def test_fp64_jvp_matches_finite_differences_and_the_gradient(fp64):
    with jax.enable_x64(True):
        m, s, f, g = fp64
        v = random_tangent(m, 11)
        jvp = eqx.filter_jit(lambda m, v, s: eqx.filter_jvp(lambda m: train.sequence_loss(m, s), (m,), (v,)))
        value, tangent = jvp(m, v, s)
        np.testing.assert_allclose(value, f(m), rtol=1e-12)
        numeric = float(_central_difference(f, m, v, EPS))
        assert abs(float(tangent) - numeric) <= RTOL * abs(numeric)
        np.testing.assert_allclose(float(tangent), _dot(g, v), rtol=1e-10)


def test_remat_gives_the_same_gradients(mm_batch):
    """With a named policy (remat=True, jax.checkpoint's default, goes through the same code)."""
    m, s = model32(), row(mm_batch, 0)
    g0 = grad(m, s)
    g1 = grad(train.with_remat(m, "dots_saveable"), s)
    assert tree_max_diff(g0, g1) <= 1e-6 * tree_max(g0)


def test_remat_is_applied_inside_the_decoder_scan(mm_batch):
    # the model alone (the blocked loss has a checkpoint of its own): remat appears with the policy, not without
    sample = {k: v for k, v in row(mm_batch, 0).items() if k != "loss_mask"}
    jaxpr = lambda m: str(jax.make_jaxpr(eqx.filter_grad(lambda m, s: jnp.sum(m(**s))))(m, sample))
    with_remat, without = jaxpr(train.with_remat(model32(), "dots_saveable")), jaxpr(train.with_remat(model32(), False))
    assert "remat" in with_remat or "checkpoint" in with_remat
    assert "remat" not in without and "checkpoint" not in without
    m = model32()
    with pytest.raises(ValueError, match="remat"):
        train.with_remat(m, "save_everything_please")


def test_per_example_gradients_equal_a_loop(mm_batch):
    m = model32()
    per_example = eqx.filter_jit(eqx.filter_vmap(eqx.filter_grad(train.sequence_loss), in_axes=(None, 0)))(m, mm_batch)
    for b in range(3):
        one = grad(m, row(mm_batch, b))
        assert tree_max_diff(row(per_example, b), one) <= 1e-5 * tree_max(one)


def test_batch_loss_is_the_token_weighted_mean_of_the_sequence_losses(mm_batch):
    m = model32()
    _, losses = batched_forward(m, mm_batch)
    counts = np.asarray([float(train.target_mask(r["input_ids"], CONFIG, attention_mask=r["attention_mask"]).sum())
                         for r in (row(mm_batch, b) for b in range(3))])
    expected = float(np.sum(np.asarray(losses) * counts) / counts.sum())
    np.testing.assert_allclose(float(eqx.filter_jit(train.batch_loss)(m, mm_batch)), expected, rtol=1e-5)


def test_jaxtyping_names_the_argument_with_the_wrong_shape():
    """The test session runs the package under the jaxtyping import hook (as notebook 02 does): a shape error
    fails at the call, naming the argument, rather than deep inside a matmul or as a silently wrong result."""
    m = model32()
    with pytest.raises(Exception, match="input_ids"):
        m(jnp.zeros((2, 5), jnp.int32))  # a batch axis: vmap instead
    attn = m.layers.layer(0).self_attn
    with pytest.raises(Exception, match="positions"):
        attn(jnp.zeros((5, CONFIG.text.hidden_size)), jnp.arange(4), jnp.ones((5, 5), bool))
