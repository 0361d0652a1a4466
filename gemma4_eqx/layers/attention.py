"""Self-attention for both layer kinds (spec §3.4).

Sliding layers: GQA, `head_dim` 256, 8 KV heads, own `v_proj`. Full (global) layers: MQA, `head_dim` 512,
one KV head and no `v_proj`: the values are the *raw* key projection (before `k_norm` and RoPE).
Both: q/k RMSNorm with weights, scale-free `v_norm`, RoPE on q and k only, attention scale 1.0.

The softmax-attention core has two implementations, chosen per module by the static field `implementation`:

- `"xla"` (default): `dot_product_attention` below, plain einsums that round where transformers' eager path
  rounds (scores in the activation dtype), so bf16 outputs match transformers bit for bit almost everywhere.
  Text-only sliding layers run it in blocks of the window (`banded_attention`, linear in the prompt); a call
  whose score matrix would pass `MAX_SCORES` elements (long prompts on the global layers) streams the keys
  with a running softmax (`streamed_attention`) instead of building it.
- `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash kernel, for every call
  whose shape cuDNN accepts (bf16/f16, head_dim <= 256: the 40 sliding layers of the 12B); other calls (the
  head_dim-512 global layers, fp32 models) stay on `"xla"`. Scores are kept in fp32 inside the kernel, so bf16
  results differ from transformers by rounding. Needs a GPU backend.
- `"auto"`: `"cudnn"` when JAX's default backend is a GPU, the call is a prefill (more than one query; for one
  query the XLA path is faster, see shared/spec/gpu-measurements.md) and cuDNN takes it (JAX raises while
  tracing when it does not, e.g. on a GPU without cuDNN); `"xla"` otherwise.

`g4.Gemma4.with_attention_implementation` switches a whole model.

Under `numerics="invariant"` (`layers/numerics.py`) every call runs `ordered_attention` instead: sums over keys
one key at a time, so a query's output does not depend on how many queries or empty slots share the call. It
needs `implementation="xla"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import LayerGeometry, RopeConfig
from .linear import Linear
from .norm import RMSNorm, compute_dtype
from .numerics import check_numerics, replaced
from .rope import apply_rope, inv_frequencies, rope_cos_sin


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
    """
    t, h, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k)
    softmax_dtype = compute_dtype(q.dtype)
    scores = jnp.where(mask[None, None], scores.astype(softmax_dtype), jnp.finfo(softmax_dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("kgts,skd->tkgd", probs, v)
    return out.reshape(t, h, d)


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


IMPLEMENTATIONS = ("xla", "cudnn", "auto")
CUDNN_MAX_HEAD_DIM = 256
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation: expected one of {IMPLEMENTATIONS}, found {implementation!r}")
    return implementation


def check_compatible(implementation: str, numerics: str) -> None:
    if numerics == "invariant" and implementation != "xla":
        raise ValueError(f"numerics='invariant' attends with its own ordered kernel and needs attention "
                         f"implementation 'xla', found {implementation!r}")


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


def attend(q: Array, k: Array, v: Array, mask: Array, implementation: str, band: int | None = None,
           numerics: str = "xla") -> Array:
    """Dispatch one attention call to the implementation named by the layer (see the module docstring).

    `band`: the mask is a sliding window of this size (see `banded_attention`); the XLA path then runs in blocks
    when the chunk is long enough for that to pay (more than two windows of queries).
    """
    if numerics == "invariant":
        if in_bands(q, band):
            return banded_attention(q, k, v, mask, band, kernel=ordered_attention)
        return ordered_attention(q, k, v, mask)
    if implementation == "auto":
        if backend() == "gpu" and q.shape[0] > 1 and cudnn_accepts(q, k):
            try:
                return fused_attention(q, k, v, mask)
            except (NotImplementedError, RuntimeError, ValueError):  # cuDNN declined this call
                pass
        return _xla_attention(q, k, v, mask, band)
    if implementation == "cudnn":
        if backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU backend; JAX's default backend is "
                             f"{backend()!r} (use 'xla' or 'auto')")
        if cudnn_accepts(q, k):
            return fused_attention(q, k, v, mask)
    return _xla_attention(q, k, v, mask, band)


def in_bands(q: Array, band: int | None) -> bool:
    """Whether a sliding-window call attends in bands: long enough (more than two windows of queries) to pay."""
    return band is not None and q.shape[0] > 2 * band


def _xla_attention(q: Array, k: Array, v: Array, mask: Array, band: int | None) -> Array:
    if in_bands(q, band):
        return banded_attention(q, k, v, mask, band)
    if q.shape[0] > 1 and q.shape[0] * q.shape[1] * k.shape[0] > MAX_SCORES:
        return streamed_attention(q, k, v, mask)
    return dot_product_attention(q, k, v, mask)


class Attention(eqx.Module):
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear | None
    o_proj: Linear
    q_norm: RMSNorm
    k_norm: RMSNorm
    v_norm: RMSNorm  # scale-free: holds no parameters
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope: RopeConfig = eqx.field(static=True)
    implementation: str = eqx.field(static=True, default="xla")  # one of IMPLEMENTATIONS
    numerics: str = eqx.field(static=True, default="xla")  # "invariant": ordered_attention (layers/numerics.py)

    def __init__(self, hidden_size: int, num_heads: int, geometry: LayerGeometry, *, eps: float,
                 key: PRNGKeyArray, std: float = 0.02, dtype=jnp.float32, implementation: str = "xla"):
        kq, kk, kv, ko = jax.random.split(key, 4)
        hd, nkv = geometry.head_dim, geometry.num_key_value_heads
        self.q_proj = Linear(hidden_size, num_heads * hd, key=kq, std=std, dtype=dtype)
        self.k_proj = Linear(hidden_size, nkv * hd, key=kk, std=std, dtype=dtype)
        self.v_proj = Linear(hidden_size, nkv * hd, key=kv, std=std, dtype=dtype) if geometry.has_v_proj else None
        self.o_proj = Linear(num_heads * hd, hidden_size, key=ko, std=std, dtype=dtype)
        self.q_norm = RMSNorm(hd, eps=eps, dtype=dtype)
        self.k_norm = RMSNorm(hd, eps=eps, dtype=dtype)
        self.v_norm = RMSNorm(hd, eps=eps, with_scale=False)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, nkv, hd
        self.rope = geometry.rope
        self.implementation = check_implementation(implementation)

    def with_implementation(self, implementation: str) -> "Attention":
        """The same module (same arrays) with another attention implementation."""
        check_compatible(check_implementation(implementation), self.numerics)
        return replaced(self, implementation=implementation)

    def with_numerics(self, numerics: str) -> "Attention":
        """The same module (same arrays), its projections and norms included, in another numerics mode;
        `"invariant"` attends with `ordered_attention`."""
        check_compatible(self.implementation, check_numerics(numerics))
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm")
        parts = {name: getattr(self, name).with_numerics(numerics) for name in names if getattr(self, name) is not None}
        return replaced(self, numerics=numerics, **parts)

    def rope_tables(self, positions: Int[Array, " seq"], dtype):
        return rope_cos_sin(positions, inv_frequencies(self.rope, self.head_dim), dtype)

    def queries(
        self, x: Float[Array, "seq hidden"], positions: Int[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        q = self.q_proj(x).reshape(x.shape[0], self.num_heads, self.head_dim)
        cos, sin = self.rope_tables(positions, x.dtype)
        return apply_rope(self.q_norm(q), cos, sin)

    def raw_kv(
        self, x: Float[Array, "seq hidden"]
    ) -> tuple[Float[Array, "seq kv_heads head_dim"], Float[Array, "seq kv_heads head_dim"] | None]:
        """The key and value projections before any norm; no value projection when values are the raw keys."""
        raw_k = self.k_proj(x).reshape(x.shape[0], self.num_kv_heads, self.head_dim)
        raw_v = None if self.v_proj is None else self.v_proj(x).reshape(raw_k.shape)
        return raw_k, raw_v

    def finish_kv(
        self,
        raw_k: Float[Array, "seq kv_heads head_dim"],
        raw_v: Float[Array, "seq kv_heads head_dim"] | None,
        positions: Int[Array, " seq"],
    ) -> tuple[Float[Array, "seq kv_heads head_dim"], Float[Array, "seq kv_heads head_dim"]]:
        """`k = rope(k_norm(raw_k))`, `v = v_norm(raw_v)`, with `raw_v = raw_k` when there is no v_proj."""
        cos, sin = self.rope_tables(positions, raw_k.dtype)
        return apply_rope(self.k_norm(raw_k), cos, sin), self.v_norm(raw_k if raw_v is None else raw_v)

    def keys_values(
        self, x: Float[Array, "seq hidden"], positions: Int[Array, " seq"]
    ) -> tuple[Float[Array, "seq kv_heads head_dim"], Float[Array, "seq kv_heads head_dim"]]:
        """Post-norm, post-RoPE keys and post-`v_norm` values."""
        return self.finish_kv(*self.raw_kv(x), positions)

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """`band`: set by the decoder stack when `mask` is a pure sliding window of that size (text-only)."""
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions)
        out = attend(q, k, v, mask, self.implementation, band, self.numerics)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))

    def with_cache(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        kv,
        ctx,
        sliding: bool,
    ):
        """Attention of a chunk of new tokens over the cache plus themselves; returns (output, updated cache)."""
        k, v, mask, kv = self.read_write_cache(x, positions, kv, ctx, sliding)
        band = ctx.band if sliding else None
        out = attend(self.queries(x, positions), k, v, mask, self.implementation, band, self.numerics)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim)), kv

    def read_write_cache(self, x: Float[Array, "seq hidden"], positions: Int[Array, " seq"], kv, ctx,
                         sliding: bool):
        """Keys, values and mask to attend over for a chunk of new tokens, and the cache with the chunk written.

        Sliding layers attend over `[ring entries, chunk]` (ring entries in slot order when the chunk is attended
        in bands, `ctx.ring_order`) and then write the chunk's last keys into the ring.
        Full layers write the chunk into its slots first and attend over all slots (`ctx` masks the unwritten).
        """
        raw_k, raw_v = self.raw_kv(x)
        if sliding:
            k_new, v_new = self.finish_kv(raw_k, raw_v, positions)
            ring_k, ring_v = (kv.k, kv.v) if ctx.ring_order is None else (kv.k[ctx.ring_order], kv.v[ctx.ring_order])
            k = jnp.concatenate([ring_k, k_new])
            v = jnp.concatenate([ring_v, v_new])
            m = ctx.ring_write.shape[0]
            kv = type(kv)(k=kv.k.at[ctx.ring_write].set(k_new[-m:]), v=kv.v.at[ctx.ring_write].set(v_new[-m:]))
            return k, v, ctx.sliding_mask, kv
        if kv.raw is not None:
            raw = jax.lax.dynamic_update_slice_in_dim(kv.raw, raw_k, ctx.start, axis=0)
            k, v = self.finish_kv(raw, None, ctx.full_positions)
            return k, v, ctx.full_mask, type(kv)(raw=raw)
        k_new, v_new = self.finish_kv(raw_k, raw_v, positions)
        k = jax.lax.dynamic_update_slice_in_dim(kv.k, k_new, ctx.start, axis=0)
        v = jax.lax.dynamic_update_slice_in_dim(kv.v, v_new, ctx.start, axis=0)
        return k, v, ctx.full_mask, type(kv)(k=k, v=v)
