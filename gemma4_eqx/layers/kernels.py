"""Softmax attention kernels: plain functions of `(q, k, v, mask)` for one sequence, scale 1.0.

Which one runs is decided by the attention layer's policies (`layers/policy.py`): the kernel policy
(`XLAKernel`, `CuDNNKernel`, `AutoKernel`) and, above it, the numerics policy (`Invariant` attends with
`ordered_attention`).

- `dot_product_attention`: plain einsums that round where transformers' eager path rounds (scores in the
  activation dtype, softmax in fp32), so bf16 outputs match transformers bit for bit almost everywhere.
- `banded_attention`: the same function for a sliding-window mask, in blocks of the window (linear in the
  prompt); `xla_attention` uses it for text-only sliding calls over more than two windows of keys (`in_bands`).
- `streamed_attention`: the same function with the keys visited in blocks and a running softmax, for calls whose
  score matrix would pass `MAX_SCORES` elements (long prompts on the global layers).
- `ordered_attention`: rounding independent of the call's shape (`numerics="invariant"`).
- `fused_attention`: `jax.nn.dot_product_attention`, cuDNN's fused flash kernel on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .numerics import compute_dtype


def dot_product_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
) -> Float[Array, "q_seq heads head_dim"]:
    """Softmax attention with scale 1.0, query head j reading KV head j // (heads / kv_heads).

    Rounding points follow transformers' eager path: scores in the activation dtype, softmax in fp32, the
    probabilities cast back before the product with V. Fully masked rows (padding queries) come out uniform,
    never NaN.

    How the products are laid out depends on the backend and the number of queries (the same function; sums in
    another order): on XLA:CPU in fp32 or fp64 a chunk of queries runs as one batched matmul per KV head
    (`_grouped_rows`), one query as a multiply-and-sum over the cache (`_one_query`); bf16 and other backends keep
    the einsum form (`_grouped_einsum`; the GPU figures were measured with it, and XLA:CPU's bf16 products are
    slower in the other forms). On XLA:CPU the einsum form transposed the score matrix and the keys into new
    buffers on every call (benchmarks/RESULTS.md, issue 19).
    """
    if backend() == "cpu" and q.dtype in (jnp.float32, jnp.float64):
        return _one_query(q, k, v, mask) if q.shape[0] == 1 else _grouped_rows(q, k, v, mask)
    return _grouped_einsum(q, k, v, mask)


def _masked_softmax(scores: Array, mask: Array, dtype) -> Array:
    """Softmax in fp32 (the activation dtype's compute dtype) over the last axis, masked entries at the minimum,
    probabilities cast back to `dtype`."""
    softmax_dtype = compute_dtype(dtype)
    scores = jnp.where(mask, scores.astype(softmax_dtype), jnp.finfo(softmax_dtype).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _grouped_einsum(q, k, v, mask):
    t, h, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k)
    probs = _masked_softmax(scores, mask[None, None], q.dtype)
    out = jnp.einsum("kgts,skd->tkgd", probs, v)
    return out.reshape(t, h, d)


def _grouped_rows(q, k, v, mask):
    # The queries of one KV head's group, all positions, as the rows of one matrix [kv, g * t, d] against the
    # head's keys [kv, s, d]: a plain batched matmul whose scores come out in the softmax's layout.
    t, h, d = q.shape
    s, kv_heads = k.shape[:2]
    g = h // kv_heads
    rows = q.reshape(t, kv_heads, g, d).transpose(1, 2, 0, 3).reshape(kv_heads, g * t, d)
    scores = jnp.einsum("kqd,ksd->kqs", rows, k.transpose(1, 0, 2)).reshape(kv_heads, g, t, s)
    probs = _masked_softmax(scores, mask[None, None], q.dtype).reshape(kv_heads, g * t, s)
    out = jnp.einsum("kqs,ksd->kqd", probs, v.transpose(1, 0, 2))
    return out.reshape(kv_heads, g, t, d).transpose(2, 0, 1, 3).reshape(t, h, d)


def _one_query(q, k, v, mask):
    # One query (a decode step): every product is a multiply and a sum over the cache as it lies, [s, kv, d], with
    # no transposed copy of the cache. Products in the compute dtype, rounded once, as a matmul's would be.
    _, h, d = q.shape
    s, kv_heads = k.shape[:2]
    g = h // kv_heads
    acc = compute_dtype(q.dtype)
    if kv_heads == 1:  # one KV head (MQA): plain products with the cache as an [s, d] matrix
        scores = jnp.einsum("sd,hd->hs", k[:, 0].astype(acc), q[0].astype(acc)).astype(q.dtype)
        probs = _masked_softmax(scores, mask, q.dtype)
        out = jnp.einsum("hs,sd->hd", probs.astype(acc), v[:, 0].astype(acc))
        return out.astype(q.dtype)[None]
    qg = q.reshape(kv_heads, g, d).astype(acc)
    scores = jnp.sum(k[:, :, None, :].astype(acc) * qg[None], axis=-1).astype(q.dtype)  # [s, kv, g]
    probs = _masked_softmax(scores.transpose(1, 2, 0), mask[0][None, None], q.dtype)  # [kv, g, s]
    out = jnp.sum(probs.transpose(2, 0, 1)[..., None].astype(acc) * v[:, :, None, :].astype(acc), axis=0)
    return out.astype(q.dtype).reshape(1, h, d)


def ordered_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
) -> Float[Array, "q_seq heads head_dim"]:
    """`dot_product_attention` whose rounding does not depend on the call's shape (`numerics="invariant"`).

    The softmax denominator and the product with V add the keys one at a time, in key order, in the softmax
    dtype: a masked key or an empty cache slot adds an exact zero wherever it sits, so a query sees the same
    sequence of roundings in a 9-slot decode step as in a 70-token forward, given its keys in the same order.
    The maximum is exact in any order. Barriers keep the inputs, the exponentials, the normaliser and the
    output out of shape-dependent fusions (XLA otherwise fuses the exp with its neighbours differently per
    shape, and the fused versions round differently). Sequential over keys: a verification path, not a fast one.
    """
    barrier = jax.lax.optimization_barrier
    q, k, v, mask = barrier((q, k, v, mask))
    t, h, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(t, kv_heads, h // kv_heads, d)
    softmax_dtype = compute_dtype(q.dtype)
    # Scores too are summed one head_dim component at a time: XLA's dot for a handful of queries and keys picks
    # its summation order by shape (one query over 9 keys rounds differently from 13 queries over 13 keys).
    # The products are exact in the softmax dtype for bf16 inputs; the scores round to the activation dtype as
    # the einsum would.
    def add_component(acc, xs):
        q_c, k_c = xs  # [t, kv, g], [s, kv]
        return acc + barrier(jnp.einsum("tkg,sk->kgts", q_c.astype(softmax_dtype), k_c.astype(softmax_dtype))), None

    scores, _ = jax.lax.scan(add_component, jnp.zeros((kv_heads, h // kv_heads, t, k.shape[0]), softmax_dtype),
                             (jnp.moveaxis(qg, -1, 0), jnp.moveaxis(k, -1, 0)))
    scores = scores.astype(q.dtype).astype(softmax_dtype)
    scores = jnp.where(mask[None, None], scores, jnp.finfo(softmax_dtype).min)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = barrier(jnp.exp(barrier(scores - top)))  # [kv, g, t, s]; masked keys exactly 0
    add = lambda acc, x: (acc + x, None)
    total, _ = jax.lax.scan(add, jnp.zeros(weights.shape[:-1], softmax_dtype), jnp.moveaxis(weights, -1, 0))
    probs = barrier((weights / barrier(total[..., None])).astype(q.dtype))

    def add_value(acc, xs):
        p, value = xs  # [kv, g, t], [kv, d]
        return acc + barrier(p[..., None].astype(softmax_dtype) * value[:, None, None, :].astype(softmax_dtype)), None

    out, _ = jax.lax.scan(add_value, jnp.zeros((kv_heads, h // kv_heads, t, d), softmax_dtype),
                          (jnp.moveaxis(probs, -1, 0), v))
    return barrier(out.astype(q.dtype).transpose(2, 0, 1, 3).reshape(t, h, d))


def banded_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
    window: int,
    kernel: Callable = dot_product_attention,
) -> Float[Array, "q_seq heads head_dim"]:
    """`dot_product_attention` for a sliding-window mask, in blocks, at a cost linear in the sequence.

    The caller guarantees the band: the queries are the last `q_seq` keys' own tokens, in order, and query i
    sees no key outside `(p + i - window, p + i]` with `p = kv_seq - q_seq` (text-only sliding layers: causal,
    window, padding; keys before the chunk sorted by slot). Queries go in blocks of `window`; block j meets only
    the `2 * window` keys from `p + (j - 1) * window` on, so no `q_seq x kv_seq` score matrix is built. Masked
    keys weigh exactly zero in both, so this is the same function; sums run in another order (none with
    `kernel=ordered_attention`, which each block runs under `numerics="invariant"`).
    """
    t, s = mask.shape
    p, b = s - t, window
    blocks = -(-t // b)
    extra = blocks * b - t
    pad = lambda x: jnp.pad(x, ((b, extra),) + ((0, 0),) * (x.ndim - 1))  # keys: window on the left, tail right
    kp, vp = pad(k), pad(v)
    mp = jnp.pad(mask, ((0, extra), (b, extra)))
    qp = jnp.pad(q, ((0, extra), (0, 0), (0, 0))).reshape(blocks, b, *q.shape[1:])
    starts = p + b * jnp.arange(blocks)  # in padded key coordinates: the block's first query sits at p + b*j + b
    take = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, 2 * b)
    kb = jax.vmap(take, (None, 0))(kp, starts)
    vb = jax.vmap(take, (None, 0))(vp, starts)
    mb = jax.vmap(lambda j, start: jax.lax.dynamic_slice(mp, (j * b, start), (b, 2 * b)))(jnp.arange(blocks), starts)
    out = jax.vmap(kernel)(qp, kb, vb, mb)
    return out.reshape(blocks * b, *q.shape[1:])[:t]


# Above this many score elements (heads x queries x keys, ~512 MiB in fp32) the XLA path streams the keys in
# blocks with a running softmax instead of building the score matrix (long prompts on the global layers).
MAX_SCORES = 2**27
KEY_BLOCK = 1024


def streamed_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
    block: int | None = None,
) -> Float[Array, "q_seq heads head_dim"]:
    """`dot_product_attention` with the keys visited in blocks of `block` (default `KEY_BLOCK`) and a running
    (online) softmax.

    Memory is `heads x q_seq x block` scores instead of `heads x q_seq x kv_seq`. Same function (exact in
    fp64); the probabilities are normalised once at the end instead of being rounded to the activation dtype
    before the product with V, so bf16 results differ from transformers' rounding (as cuDNN's do).
    """
    t, h, d = q.shape
    s, kv_heads = k.shape[:2]
    block = KEY_BLOCK if block is None else block
    blocks = -(-s // block)
    extra = blocks * block - s
    kb = jnp.pad(k, ((0, extra), (0, 0), (0, 0))).reshape(blocks, block, kv_heads, d)
    vb = jnp.pad(v, ((0, extra), (0, 0), (0, 0))).reshape(blocks, block, kv_heads, d)
    mb = jnp.pad(mask, ((0, 0), (0, extra))).reshape(t, blocks, block).transpose(1, 0, 2)
    qg = q.reshape(t, kv_heads, h // kv_heads, d)
    acc_dtype = compute_dtype(q.dtype)
    low = jnp.finfo(acc_dtype).min

    def step(carry, xs):
        m, l, acc = carry
        k_j, v_j, mask_j = xs
        scores = jnp.einsum("tkgd,skd->kgts", qg, k_j).astype(acc_dtype)
        scores = jnp.where(mask_j[None, None], scores, low)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        keep = jnp.exp(m - m_new)
        l = l * keep + p.sum(-1)
        acc = acc * keep[..., None] + jnp.einsum("kgts,skd->kgtd", p, v_j.astype(acc_dtype))
        return (m_new, l, acc), None

    g = h // kv_heads
    init = (jnp.full((kv_heads, g, t), low, acc_dtype), jnp.zeros((kv_heads, g, t), acc_dtype),
            jnp.zeros((kv_heads, g, t, d), acc_dtype))
    (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb))
    out = (acc / l[..., None]).astype(q.dtype)  # [kv, g, t, d]
    return out.transpose(2, 0, 1, 3).reshape(t, h, d)


CUDNN_MAX_HEAD_DIM = 256
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_accepts(q: Array, k: Array) -> bool:
    """Whether cuDNN's fused attention takes these shapes and dtypes (checked at trace time)."""
    return q.dtype in CUDNN_DTYPES and q.shape[-1] <= CUDNN_MAX_HEAD_DIM and q.shape[-1] % 8 == 0


def fused_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
    implementation: Literal["xla", "cudnn"] = "cudnn",
) -> Float[Array, "q_seq heads head_dim"]:
    """The same attention through `jax.nn.dot_product_attention` (scale 1.0, the boolean mask as given).

    `implementation="xla"` runs JAX's reference of the same call, which the tests compare with ours on CPU.
    """
    return jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask[None, None], scale=1.0,
                                        implementation=implementation)[0]


def backend() -> str:
    return jax.default_backend()


def in_bands(q: Array, k: Array, band: int | None) -> bool:
    """Whether a sliding-window call attends in bands: worth it when there are more than two windows of keys (the
    bands score about `q_seq x 2 band` pairs against `q_seq x kv_seq` dense) and more than one window of queries."""
    return band is not None and q.shape[0] > band and k.shape[0] > 2 * band


def xla_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
    band: int | None = None,
) -> Float[Array, "q_seq heads head_dim"]:
    """Ours: in bands for long sliding-window calls, streamed past `MAX_SCORES` score elements, else dense."""
    if in_bands(q, k, band):
        return banded_attention(q, k, v, mask, band)
    if q.shape[0] > 1 and q.shape[0] * q.shape[1] * k.shape[0] > MAX_SCORES:
        return streamed_attention(q, k, v, mask)
    return dot_product_attention(q, k, v, mask)
