"""The blocked cross-entropy equals the dense one; packed rows score like their sequences run one by one."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx import losses
from gemma4_eqx.testing import random_model


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@functools.partial(jax.jit, static_argnums=range(5))  # one program per problem, not one per random op and shape
def _problem(seq, vocab, hidden, dtype, seed=0):
    kh, ke, kt = jax.random.split(jax.random.key(seed), 3)
    h = 3.0 * jax.random.normal(kh, (seq, hidden), dtype)
    table = jax.random.normal(ke, (vocab, hidden), dtype)
    targets = jax.random.randint(kt, (seq,), 0, vocab)
    weights = jnp.linspace(0.5, 1.5, seq, dtype=dtype)  # a cotangent that differs per row
    return h, table, targets, weights


@pytest.mark.parametrize("block, vocab_block", [(4, 16), (5, 7), (64, 1000), (1, 1)])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_blocked_equals_dense_in_fp64(x64, block, vocab_block, softcap):
    # seq 23 and vocab 50 divide by none of the blocks' sizes except 1: padding rows and the vocab tail are used
    h, table, targets, weights = _problem(23, 50, 12, jnp.float64)

    def loss(fn, **kw):
        return lambda h, table: jnp.sum(weights * fn(h, table, targets, softcap=softcap, **kw))

    dense = jax.value_and_grad(loss(losses.dense_next_token_nll), argnums=(0, 1))(h, table)
    blocked = jax.value_and_grad(loss(losses.next_token_nll, block_size=block, vocab_block_size=vocab_block),
                                 argnums=(0, 1))(h, table)
    (vd, (gh_d, ge_d)), (vb, (gh_b, ge_b)) = dense, blocked
    assert vd.dtype == jnp.float64
    assert abs(float(vd - vb)) <= 1e-10
    assert float(jnp.max(jnp.abs(gh_d - gh_b))) <= 1e-10
    assert float(jnp.max(jnp.abs(ge_d - ge_b))) <= 1e-10
    assert float(jnp.max(jnp.abs(ge_d))) > 1e-3  # the gradients compared are not trivially zero


def test_bf16_embedding_gradient_is_as_accurate_as_the_dense_one():
    # fp32 loss, bf16 embedding (a bf16 model): by default the gradient is summed over the 4 row blocks in fp32
    h, table, targets, _ = _problem(256, 512, 16, jnp.float32, seed=2)
    table16 = table.astype(jnp.bfloat16)

    def grad_table(fn, table, **kw):
        return jax.grad(lambda e: jnp.sum(fn(h, e, targets, softcap=30.0, **kw)))(table)

    exact = grad_table(losses.dense_next_token_nll, table16.astype(jnp.float32))
    dense = grad_table(losses.dense_next_token_nll, table16)
    blocked = grad_table(losses.next_token_nll, table16, block_size=64, vocab_block_size=128)
    assert blocked.dtype == jnp.bfloat16
    err = lambda g: float(jnp.max(jnp.abs(g.astype(jnp.float32) - exact)))
    assert err(blocked) <= 1.01 * err(dense)


def test_blocked_per_row_values_under_jit():
    h, table, targets, _ = _problem(40, 300, 16, jnp.float32, seed=1)
    dense = losses.dense_next_token_nll(h, table, targets, softcap=30.0)
    blocked = jax.jit(lambda h, t: losses.next_token_nll(h, t, targets, softcap=30.0, block_size=16,
                                                        vocab_block_size=64))(h, table)
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


def test_train_loss_uses_the_blocked_loss_and_matches_the_logits():
    cfg = g4.small_config(vocab_size=256)
    model = random_model(cfg, seed=3)
    ids = jax.random.randint(jax.random.key(4), (20,), 0, 240)
    total, count = eqx.filter_jit(g4.train.sequence_nll)(model, ids)  # compiled: eagerly, every op compiles alone
    logits = eqx.filter_jit(lambda m, x: m(x))(model, ids)
    ref = jnp.sum(jax.nn.logsumexp(logits[:-1], -1) - jnp.take_along_axis(logits[:-1], ids[1:, None], -1)[:, 0])
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


def _text_model():
    # window 4 < the sequences' lengths, so the sliding rule is exercised inside segments
    return random_model(g4.small_config(vocab_size=256, sliding_window=4), seed=5)


def test_packed_text_loss_equals_the_sum_of_its_sequences():
    model = _text_model()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 240, n) for n in (9, 6, 11)]
    (row,) = losses.pack_sequences(seqs, 30, pad_id=0)
    total, count = losses.packed_sequence_nll(model, **{k: jnp.asarray(v) for k, v in row.items()})
    alone = [g4.train.sequence_nll(model, jnp.asarray(s)) for s in seqs]
    assert int(count) == sum(len(s) - 1 for s in seqs)
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


def test_packed_rows_ignore_what_the_other_segments_hold():
    model = _text_model()
    a, b, c = np.arange(10, 22), np.arange(50, 57), np.arange(100, 105)
    (r1,) = losses.pack_sequences([a, b], 24)
    (r2,) = losses.pack_sequences([a, c], 24)
    h1 = losses.packed_hidden_states(model, jnp.asarray(r1["input_ids"]), jnp.asarray(r1["segment_ids"]),
                                     positions=jnp.asarray(r1["positions"]))
    h2 = losses.packed_hidden_states(model, jnp.asarray(r2["input_ids"]), jnp.asarray(r2["segment_ids"]),
                                     positions=jnp.asarray(r2["positions"]))
    np.testing.assert_allclose(np.asarray(h1[:12]), np.asarray(h2[:12]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h1[12:19]), np.asarray(model.hidden_states(jnp.asarray(b))),
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
    total, count = losses.packed_sequence_nll(model, **{k: jnp.asarray(v) for k, v in row.items()})
    t1, c1 = g4.train.sequence_nll(model, jnp.asarray(text))
    t2, c2 = g4.train.sequence_nll(model, jnp.asarray(image_ids), mm_token_type_ids=jnp.asarray(image_types),
                                   **{k: jnp.asarray(v) for k, v in sample.items()})
    assert int(count) == int(c1) + int(c2)
    np.testing.assert_allclose(float(total), float(t1) + float(t2), rtol=1e-5)


def test_packed_batch_loss_is_token_weighted():
    model = _text_model()
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 240, n) for n in (9, 6, 11, 5)]
    rows = losses.pack_sequences(seqs, 16)
    batch = {k: jnp.stack([jnp.asarray(r[k]) for r in rows]) for k in rows[0]}
    loss = losses.packed_batch_loss(model, batch)
    alone = [g4.train.sequence_nll(model, jnp.asarray(s)) for s in seqs]
    expected = sum(float(t) for t, _ in alone) / sum(float(c) for _, c in alone)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
