"""The blocked cross-entropy equals the dense one; packed rows score like their sequences run one by one."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.train import losses
from gemma4_eqx.testing import filled_model


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _problem(seq, vocab, hidden, dtype, seed=0):
    """Hidden states, a tied embedding table, targets and per-row loss weights (drawn with numpy: a jax.random
    program would be compiled for every problem's shapes)."""
    rng = np.random.default_rng(seed)
    h = 3.0 * rng.standard_normal((seq, hidden))
    table = rng.standard_normal((vocab, hidden))
    targets = rng.integers(0, vocab, seq)
    weights = np.linspace(0.5, 1.5, seq)  # a cotangent that differs per row
    return (jnp.asarray(h.astype(dtype)), jnp.asarray(table.astype(dtype)), jnp.asarray(targets.astype(np.int32)),
            jnp.asarray(weights.astype(dtype)))


@functools.partial(jax.jit, static_argnames=("nll", "softcap"))
def _value_and_grads(h, table, targets, weights, *, nll, softcap):
    """sum(weights * nll(h, table, targets)) and its gradients in h and the table: one compiled program per loss
    function and soft cap (eagerly, every operation of the forward and backward pass compiles alone)."""
    loss = lambda h, table: jnp.sum(weights * nll(h, table, targets, softcap=softcap))
    return jax.value_and_grad(loss, argnums=(0, 1))(h, table)


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64))))


@pytest.mark.parametrize("block, vocab_block", [(4, 16), (5, 7), (64, 1000), (1, 1)])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_blocked_equals_dense_in_fp64(x64, block, vocab_block, softcap):
    # seq 23 and vocab 50 divide by none of the blocks' sizes except 1: padding rows and the vocab tail are used
    h, table, targets, weights = _problem(23, 50, 12, jnp.float64)
    blocked_nll = functools.partial(losses.next_token_nll, block_size=block, vocab_block_size=vocab_block)

    dense = _value_and_grads(h, table, targets, weights, nll=losses.dense_next_token_nll, softcap=softcap)
    blocked = _value_and_grads(h, table, targets, weights, nll=blocked_nll, softcap=softcap)
    (vd, (gh_d, ge_d)), (vb, (gh_b, ge_b)) = dense, blocked
    assert vd.dtype == jnp.float64
    assert abs(float(vd) - float(vb)) <= 1e-10
    assert _max_abs(np.asarray(gh_d) - np.asarray(gh_b)) <= 1e-10
    assert _max_abs(np.asarray(ge_d) - np.asarray(ge_b)) <= 1e-10
    assert _max_abs(ge_d) > 1e-3  # the gradients compared are not trivially zero


def test_bf16_embedding_gradient_is_as_accurate_as_the_dense_one():
    # fp32 loss, bf16 embedding (a bf16 model): by default the gradient is summed over the 4 row blocks in fp32
    h, table, targets, _ = _problem(256, 512, 16, jnp.float32, seed=2)
    table16 = jnp.asarray(np.asarray(table).astype(jnp.bfloat16))  # numpy (ml_dtypes) rounds to nearest even too

    @functools.partial(jax.jit, static_argnames="fn")  # one program per loss and table dtype
    def grad_table(table, fn):
        return jax.grad(lambda e: jnp.sum(fn(h, e, targets, softcap=30.0)))(table)

    blocked_nll = functools.partial(losses.next_token_nll, block_size=64, vocab_block_size=128)
    exact = np.asarray(grad_table(jnp.asarray(np.asarray(table16, np.float32)), losses.dense_next_token_nll))
    dense = grad_table(table16, losses.dense_next_token_nll)
    blocked = grad_table(table16, blocked_nll)
    assert blocked.dtype == jnp.bfloat16
    err = lambda g: float(np.max(np.abs(np.asarray(g, np.float32) - exact)))
    assert err(blocked) <= 1.01 * err(dense)


def test_blocked_per_row_values_under_jit():
    h, table, targets, _ = _problem(40, 300, 16, jnp.float32, seed=1)
    both = jax.jit(lambda h, t: (losses.dense_next_token_nll(h, t, targets, softcap=30.0),
                                 losses.next_token_nll(h, t, targets, softcap=30.0, block_size=16,
                                                       vocab_block_size=64)))
    dense, blocked = both(h, table)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), rtol=2e-6, atol=2e-5)


def test_blocked_keeps_no_full_logits_in_the_backward_pass():
    # memory_analysis of the compiled value-and-grad, on shapes only: the blocked temporaries stay far below
    # one [seq, vocab] fp32 array, while the dense ones exceed it
    seq, vocab, hidden = 1024, 16384, 64
    h = jax.ShapeDtypeStruct((seq, hidden), jnp.float32)
    table = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    targets = jax.ShapeDtypeStruct((seq,), jnp.int32)

    def temp_bytes(fn):
        f = jax.value_and_grad(lambda h, e, t: jnp.sum(fn(h, e, t)), argnums=(0, 1))
        return jax.jit(f).lower(h, table, targets).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = seq * vocab * 4
    dense = temp_bytes(lambda h, e, t: losses.dense_next_token_nll(h, e, t, softcap=30.0))
    blocked = temp_bytes(lambda h, e, t: losses.next_token_nll(h, e, t, softcap=30.0, block_size=128,
                                                              vocab_block_size=2048))
    assert dense >= logits_bytes
    assert blocked < logits_bytes / 8


def test_bad_block_size_is_named():
    h, table, targets, _ = _problem(4, 10, 8, jnp.float32)
    with pytest.raises(ValueError, match="block_size"):
        losses.next_token_nll(h, table, targets, softcap=None, block_size=0)


# ---- the model's loss ---------------------------------------------------------------------------------
def _draw(name, shape, rng):
    """gemma4_eqx.testing.random_model's scheme (see its docstring), drawn with numpy: random_model initialises
    eagerly and compiles a random program per leaf shape."""
    module = name.rsplit(".", 2)[-2] if "." in name else ""
    normal = lambda std, center=0.0: center + std * rng.standard_normal(shape)
    if name == "embed_tokens":
        return normal(0.6)
    if name.endswith("layer_scalar"):
        return rng.uniform(0.5, 1.5, shape)
    if name.endswith("pos_embedding"):
        return normal(0.5)
    if name.endswith(".bias"):
        return normal(0.02 if module == "patch_dense" else 0.2)
    if module.endswith("_proj") or module in ("patch_dense", "embedding_projection"):  # [.., in, out]
        return normal(shape[-2] ** -0.5)
    if name.endswith(".weight"):  # RMSNorm / LayerNorm weights
        gain = {"post_attention_layernorm": 3.6, "post_feedforward_layernorm": 3.6, "q_norm": 0.4, "k_norm": 0.4}
        return gain.get(module, 1.0) * normal(0.3, 1.0)
    raise ValueError(f"no rule for {name}")


def random_model(cfg, seed):
    """A model with gemma4_eqx.testing.random_model's distributions (not its values), built without compiling."""
    return filled_model(cfg, _draw, seed=seed)


# The package's functions under test, each compiled once per model structure and shapes and shared by the tests
# (run eagerly, every operation compiles alone); the model is an argument, not a baked-in constant.
sequence_nll = eqx.filter_jit(g4.train.sequence_nll)
packed_sequence_nll = eqx.filter_jit(losses.packed_sequence_nll)
packed_hidden_states = eqx.filter_jit(losses.packed_hidden_states)
packed_batch_loss = eqx.filter_jit(losses.packed_batch_loss)
hidden_states = eqx.filter_jit(lambda m, ids: m.hidden_states(ids))


def test_train_loss_uses_the_blocked_loss_and_matches_the_logits():
    cfg = g4.small_config(vocab_size=256)
    model = random_model(cfg, seed=3)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 240, 20), jnp.int32)
    total, count = sequence_nll(model, ids)

    @eqx.filter_jit
    def dense_nll(m, ids):  # the reference: the full logits' cross-entropy
        logits = m(ids)
        return jnp.sum(jax.nn.logsumexp(logits[:-1], -1) - jnp.take_along_axis(logits[:-1], ids[1:, None], -1)[:, 0])

    ref = dense_nll(model, ids)
    assert int(count) == 19
    np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)


# ---- packing ------------------------------------------------------------------------------------------
def test_pack_sequences_layout():
    rows = losses.pack_sequences([[5, 6, 7], [8, 9], [10, 11, 12, 13]], 6, pad_id=0)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["input_ids"], [5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows[0]["attention_mask"], [True] * 5 + [False])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"sequences\[0\]: length 7"):
        losses.pack_sequences([list(range(7))], 6)


@functools.lru_cache(maxsize=None)
def _text_model():
    # window 4 < the sequences' lengths, so the sliding rule is exercised inside segments
    return random_model(g4.small_config(vocab_size=256, sliding_window=4), seed=5)


def test_packed_text_loss_equals_the_sum_of_its_sequences():
    model = _text_model()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 240, n) for n in (9, 6, 11)]
    (row,) = losses.pack_sequences(seqs, 30, pad_id=0)
    total, count = packed_sequence_nll(model, **{k: jnp.asarray(v) for k, v in row.items()})
    alone = [sequence_nll(model, jnp.asarray(s)) for s in seqs]
    assert int(count) == sum(len(s) - 1 for s in seqs)
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


def test_packed_rows_ignore_what_the_other_segments_hold():
    model = _text_model()
    a, b, c = np.arange(10, 22), np.arange(50, 57), np.arange(100, 105)
    (r1,) = losses.pack_sequences([a, b], 24)
    (r2,) = losses.pack_sequences([a, c], 24)
    h1 = packed_hidden_states(model, jnp.asarray(r1["input_ids"]), jnp.asarray(r1["segment_ids"]),
                              positions=jnp.asarray(r1["positions"]))
    h2 = packed_hidden_states(model, jnp.asarray(r2["input_ids"]), jnp.asarray(r2["segment_ids"]),
                              positions=jnp.asarray(r2["positions"]))
    np.testing.assert_allclose(np.asarray(h1)[:12], np.asarray(h2)[:12], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h1)[12:19], np.asarray(hidden_states(model, jnp.asarray(b))),
                               rtol=1e-5, atol=1e-5)


def test_packed_multimodal_loss_equals_the_sum_of_its_sequences():
    cfg = g4.small_config(vocab_size=256, sliding_window=4)
    model = random_model(cfg, seed=6)
    v = cfg.vision
    n_soft = 3
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(1, n_soft, v.patch_dim)).astype(np.float32)  # one soft token per raw patch
    xy = np.stack([np.arange(n_soft), np.zeros(n_soft, int)], -1)[None]
    image_ids = [5, 6, cfg.boi_token_id] + [cfg.image_token_id] * n_soft + [cfg.eoi_token_id, 7, 8]
    image_types = [0, 0, 0] + [1] * n_soft + [0, 0, 0]
    text = rng.integers(10, 240, 7)
    sample = {"pixel_values": pixels, "image_position_ids": xy.astype(np.int32)}
    extras = [{"mm_token_type_ids": np.zeros(7, np.int32)},
              {"mm_token_type_ids": np.asarray(image_types, np.int32), **sample}]
    (row,) = losses.pack_sequences([text, image_ids], 20, extras=extras)
    assert row["pixel_values"].shape == pixels.shape
    total, count = packed_sequence_nll(model, **{k: jnp.asarray(v) for k, v in row.items()})
    t1, c1 = sequence_nll(model, jnp.asarray(text))
    t2, c2 = sequence_nll(model, jnp.asarray(image_ids), mm_token_type_ids=jnp.asarray(image_types),
                          **{k: jnp.asarray(v) for k, v in sample.items()})
    assert int(count) == int(c1) + int(c2)
    np.testing.assert_allclose(float(total), float(t1) + float(t2), rtol=1e-5)


def test_packed_batch_loss_is_token_weighted():
    model = _text_model()
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 240, n) for n in (9, 6, 11, 5)]
    rows = losses.pack_sequences(seqs, 16)
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    loss = packed_batch_loss(model, batch)
    alone = [sequence_nll(model, jnp.asarray(s)) for s in seqs]
    expected = sum(float(t) for t, _ in alone) / sum(float(c) for _, c in alone)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
