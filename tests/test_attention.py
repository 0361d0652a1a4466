"""The attention implementations: ours (`"xla"`), `jax.nn.dot_product_attention` (`"cudnn"`), and the dispatch.

cuDNN itself needs a GPU; here the same call runs through JAX's XLA reference of `jax.nn.dot_product_attention`,
which checks our argument layout, mask and scale, and the dispatch is exercised by pretending the backend is a
GPU with the fused call routed to that reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.assets import TINY_CHECKPOINT
from gemma4_eqx.layers import attention as attn
from gemma4_eqx.layers import kernels
from gemma4_eqx.layers import kernels, policy


def _mask(t, s, window, pad):
    """Query i is key slot s - t + i: causal, inside the window, and keys before slot `pad` are padding."""
    slots = np.arange(s)
    q_slots = slots[s - t:]
    return (slots[None] <= q_slots[:, None]) & (slots[None] > q_slots[:, None] - window) & (slots >= pad)[None]


# Random inputs drawn with numpy: nothing to compile (jax.random compiled a program per shape and dtype, seconds
# each). The kernels are compared on the inputs they are given; the draws themselves are not the point.
def _inputs(heads, kv_heads, head_dim, t=24, s=24, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal(shape), dtype)
               for shape in ((t, heads, head_dim), (s, kv_heads, head_dim), (s, kv_heads, head_dim)))
    mask = _mask(t, s, 8, pad=3)  # left padding
    mask[10:15, 10:15] = True  # a bidirectional vision block: non-causal entries
    return q, k, v, jnp.asarray(mask)


# The kernels compared below, compiled once per shape (eagerly, each of their primitives compiles on its own).
_dense = jax.jit(kernels.dot_product_attention)
_banded = jax.jit(kernels.banded_attention, static_argnums=4)
_streamed = jax.jit(kernels.streamed_attention, static_argnums=4)
_fused = jax.jit(kernels.fused_attention, static_argnames="implementation")


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (4, 1, 32), (8, 8, 8)])
def test_fused_call_equals_ours_in_float32(heads, kv_heads, head_dim):
    q, k, v, mask = _inputs(heads, kv_heads, head_dim)
    ours = _dense(q, k, v, mask)
    fused = _fused(q, k, v, mask, implementation="xla")
    valid = np.asarray(mask).any(-1)  # fully masked (padding) queries are garbage in both
    # The two sum the scores in different orders: each score is off by a few ulps of the largest (|q.k| near 18
    # here, ~2e-6 per ulp), and the softmax passes that on to the outputs (|v| ~ 1). 2e-6 held on one x86-64 host
    # and missed by 1% on another; four ulps of the largest score is the bound a rounding difference stays under.
    scores = np.einsum("thd,shd->hts", np.asarray(q), np.repeat(np.asarray(k), heads // kv_heads, axis=1))
    bound = 4 * np.finfo(np.float32).eps * np.abs(scores).max()
    assert np.abs(np.asarray(ours) - np.asarray(fused))[valid].max() <= bound


def test_fused_call_in_bf16_differs_only_by_rounding():
    q, k, v, mask = _inputs(4, 2, 16, dtype=jnp.bfloat16)
    ours = np.asarray(kernels.dot_product_attention(q, k, v, mask)).astype(np.float32)
    fused = np.asarray(_fused(q, k, v, mask, implementation="xla")).astype(np.float32)
    exact = np.asarray(_dense(*(np.asarray(x).astype(np.float32) for x in (q, k, v)), mask))
    valid = np.asarray(mask).any(-1)
    # jax keeps the scores in fp32, we round them to bf16 as transformers does: both are bf16-accurate.
    for out in (ours, fused):
        assert np.abs(out - exact)[valid].max() <= 0.05
    assert np.abs(fused - exact)[valid].max() <= np.abs(ours - exact)[valid].max() + 1e-2


def test_auto_is_our_xla_path_on_cpu():
    q, k, v, mask = _inputs(4, 2, 16, dtype=jnp.bfloat16)
    assert jax.default_backend() == "cpu"
    same = policy.AutoKernel().attend(q, k, v, mask, None)
    assert np.array_equal(np.asarray(same), np.asarray(kernels.dot_product_attention(q, k, v, mask)))


def test_cudnn_without_a_gpu_is_a_clear_error():
    q, k, v, mask = _inputs(4, 2, 16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU backend.*'cpu'"):
        policy.CuDNNKernel().attend(q, k, v, mask, None)


def test_unknown_implementation_is_rejected():
    model = g4.load(TINY_CHECKPOINT)
    with pytest.raises(ValueError, match="expected one of .*'flash'"):
        model.with_attention_implementation("flash")


def test_with_attention_implementation_keeps_the_arrays():
    model = g4.load(TINY_CHECKPOINT)
    auto = model.with_attention_implementation("auto")
    attentions = [x for x in jax.tree.leaves(auto, is_leaf=lambda x: isinstance(x, attn.Attention))
                  if isinstance(x, attn.Attention)]
    assert attentions and all(a.kernel.name == "auto" for a in attentions)
    assert all(a is b for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(auto)))
    loaded = g4.load(TINY_CHECKPOINT, attention_implementation="auto")
    assert jax.tree.structure(loaded) == jax.tree.structure(auto)


def test_dispatch_on_a_gpu_routes_prefill_through_the_fused_call(monkeypatch):
    """With the backend reported as a GPU, "auto" sends multi-query bf16 calls with head_dim <= 256 to the fused
    call (here JAX's XLA reference of it) and keeps decode steps (one query) on our path."""
    calls = []

    def fused_reference(q, k, v, mask, implementation="cudnn"):
        calls.append(q.shape)
        return jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask[None, None], scale=1.0,
                                            implementation="xla")[0]

    monkeypatch.setattr(policy, "backend", lambda: "gpu")
    monkeypatch.setattr(policy, "fused_attention", fused_reference)
    model = g4.load(TINY_CHECKPOINT, dtype=jnp.bfloat16)
    auto = model.with_attention_implementation("auto")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, 40), jnp.int32)
    ours, fused = model(ids), auto(ids)
    assert calls and all(shape[0] == 40 for shape in calls)
    # Same model, scores kept in fp32 instead of bf16: agreement within bf16 noise, same ranking.
    assert np.abs(np.asarray(ours, np.float32) - np.asarray(fused, np.float32)).max() <= 0.5
    n_prefill = len(calls)
    cache = g4.KVCache.init(model.config, max_len=48, dtype=jnp.bfloat16)
    _, cache = auto.prefill(ids, cache)
    assert len(calls) > n_prefill
    n_after_prefill = len(calls)
    auto.decode_step(jnp.int32(5), cache)
    assert len(calls) == n_after_prefill  # one query: our XLA path


def test_an_int_attention_mask_as_the_processor_returns_it_equals_the_bool_mask():
    model = g4.load(TINY_CHECKPOINT)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, 12), jnp.int32)
    mask = np.ones(12, np.int64)
    mask[:3] = 0
    positions = jnp.asarray(np.maximum(np.cumsum(mask) - 1, 0), jnp.int32)
    as_int = model(ids, attention_mask=jnp.asarray(mask), positions=positions)
    as_bool = model(ids, attention_mask=jnp.asarray(mask, bool), positions=positions)
    assert np.array_equal(np.asarray(as_int)[3:], np.asarray(as_bool)[3:])
    cache = g4.KVCache.init(model.config, max_len=16, dtype=model.dtype)
    logits, _ = model.prefill(ids, cache, attention_mask=jnp.asarray(mask), positions=positions)
    assert np.abs(np.asarray(logits) - np.asarray(as_bool)[-1]).max() <= 1e-5


def test_auto_falls_back_to_ours_when_cudnn_declines(monkeypatch):
    def declined(*args, **kwargs):
        raise RuntimeError("cuDNN: unsupported configuration")

    monkeypatch.setattr(policy, "backend", lambda: "gpu")
    monkeypatch.setattr(policy, "fused_attention", declined)
    q, k, v, mask = _inputs(4, 2, 16, dtype=jnp.bfloat16)
    assert np.array_equal(np.asarray(policy.AutoKernel().attend(q, k, v, mask, None)),
                          np.asarray(kernels.dot_product_attention(q, k, v, mask)))
    with pytest.raises(RuntimeError, match="unsupported configuration"):  # an explicit "cudnn" does not hide it
        policy.CuDNNKernel().attend(q, k, v, mask, None)


def _band_inputs(t, prefix, window, dtype, seed=0, pad=3):
    """Queries = the last t of prefix + t keys; a text sliding-window mask with left padding (numpy draws)."""
    s = prefix + t
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal(shape), dtype) for shape in ((t, 4, 16), (s, 2, 16), (s, 2, 16)))
    return q, k, v, jnp.asarray(_mask(t, s, window, pad))


@pytest.mark.parametrize("t, prefix", [(40, 0), (37, 0), (40, 8), (19, 8), (64, 5)])
def test_banded_attention_is_the_same_function(t, prefix):
    window = 8
    with jax.enable_x64(True):
        q, k, v, mask = _band_inputs(t, prefix, window, jnp.float64)
        dense = np.asarray(_dense(q, k, v, mask))
        banded = np.asarray(_banded(q, k, v, mask, window))
        valid = np.asarray(mask).any(-1)
        assert np.abs(dense - banded)[valid].max() <= 1e-13
    q, k, v, mask = _band_inputs(t, prefix, window, jnp.float32)
    valid = np.asarray(mask).any(-1)
    dense = np.asarray(_dense(q, k, v, mask))
    banded = np.asarray(_banded(q, k, v, mask, window))
    with jax.enable_x64(True):  # the same fp32 inputs, computed in fp64
        exact = np.asarray(_dense(*(jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)), mask))
    # fp32 rounding only: each within ~20 ulp of the exact answer (outputs up to ~3), so within 2e-6 of each other
    for out in (dense, banded):
        assert np.abs(out - exact)[valid].max() <= 1.5e-6
    assert np.abs(dense - banded)[valid].max() <= 2e-6


def test_long_text_forward_and_chunked_prefill_attend_in_bands_exactly():
    """tiny_a's window is 8: a 70-token text prompt takes the banded path, in the forward and in a prefill chunk
    that follows a first chunk (a rotated, partly filled ring, sorted by slot for the bands)."""
    import hf_reference as ref

    with jax.enable_x64(True):
        m = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        w = m.config.text.sliding_window
        ids = jnp.asarray(np.random.default_rng(2).integers(3, 400, 70), jnp.int32)
        h = m.embed(ids)
        positions = jnp.arange(70)
        from gemma4_eqx.model.masks import layer_masks
        masks = layer_masks(positions, positions, jnp.ones(70, bool), w)
        dense = np.asarray(m.layers(h, positions, masks))
        banded = np.asarray(m.layers(h, positions, masks, w))
        assert np.abs(dense - banded).max() <= 1e-12
        full = np.asarray(m(ids))
        cache = g4.KVCache.init(m.config, max_len=80, dtype=jnp.float64)
        _, cache = m.prefill(ids[:13], cache)
        logits, cache = m.prefill(ids[13:], cache)  # 57 tokens > 2 windows: banded, ring rotated
        assert np.abs(np.asarray(logits) - full[-1]).max() <= 1e-12
        step, _ = m.decode_step(jnp.int32(7), cache)
        again = np.asarray(m(jnp.concatenate([ids, jnp.asarray([7], jnp.int32)])))[-1]
        assert np.abs(np.asarray(step) - again).max() <= 1e-12


@pytest.mark.parametrize("t, s, block", [(24, 24, 8), (5, 37, 16), (24, 24, 64)])
def test_streamed_attention_is_the_same_function(t, s, block):
    with jax.enable_x64(True):
        q, k, v, mask = _inputs(4, 2, 16, t=t, s=s, dtype=jnp.float64)
        valid = np.asarray(mask).any(-1)
        dense = np.asarray(_dense(q, k, v, mask))
        streamed = np.asarray(_streamed(q, k, v, mask, block))
        assert np.abs(dense - streamed)[valid].max() <= 1e-13
    q, k, v, mask = _inputs(4, 1, 32, t=t, s=s, dtype=jnp.float32)
    valid = np.asarray(mask).any(-1)
    diff = np.abs(np.asarray(_dense(q, k, v, mask)) - np.asarray(_streamed(q, k, v, mask, block)))
    assert diff[valid].max() <= 2e-6


def test_long_calls_stream_instead_of_building_the_score_matrix(monkeypatch):
    """Past MAX_SCORES the XLA path streams; the model's logits stay the same (fp64)."""
    import hf_reference as ref

    with jax.enable_x64(True):
        m = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        ids = jnp.asarray(np.random.default_rng(3).integers(3, 400, 40), jnp.int32)
        before = np.asarray(m(ids))
        monkeypatch.setattr(kernels, "MAX_SCORES", 100)
        monkeypatch.setattr(kernels, "KEY_BLOCK", 16)
        calls = []
        original = kernels.streamed_attention
        monkeypatch.setattr(kernels, "streamed_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
        after = np.asarray(m(ids))
        assert calls  # the global layers (and no banded sliding layer) took the streamed path
        assert np.abs(before - after).max() <= 1e-12
