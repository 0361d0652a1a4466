"""Causal linear attention over a pretrained `Attention`'s projections: the example replacement for
`g4.surgery.replace_attention` (e.g. on the global layers).

`phi(x) = elu(x W) + 1` with a learnable feature map `W` per KV head, initialised to the identity; queries, keys,
values, norms, RoPE and the KV cache are the wrapped `Attention`'s own, so only `W` is new.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .attention import AbstractAttention, Attention
from .cache import CacheContext, LayerCache
from .numerics import compute_dtype
from .policy import Invariant, Numerics, Policy


def linear_attention(
    q: Float[Array, "q_seq heads head_dim"],
    k: Float[Array, "kv_seq kv_heads head_dim"],
    v: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "q_seq kv_seq"],
    feature_map: Float[Array, "kv_heads head_dim features"],
) -> Float[Array, "q_seq heads head_dim"]:
    """`sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)` over visible keys, `phi(x) = elu(x W) + 1`.

    Written in its masked (parallel) form, which honours any mask (padding, bidirectional vision blocks) and
    equals the O(1)-state recurrent form on causal masks. A row with no visible key gives 0.
    """
    t, h, d = q.shape
    kv_heads = k.shape[1]
    dt = compute_dtype(q.dtype)
    w = feature_map.astype(dt)
    fq = jax.nn.elu(jnp.einsum("tkgd,kdf->tkgf", q.reshape(t, kv_heads, h // kv_heads, d).astype(dt), w)) + 1
    fk = jax.nn.elu(jnp.einsum("skd,kdf->skf", k.astype(dt), w)) + 1
    scores = jnp.einsum("tkgf,skf->tkgs", fq, fk) * mask[:, None, None, :]
    out = jnp.einsum("tkgs,skd->tkgd", scores, v.astype(dt)) / (scores.sum(-1, keepdims=True) + 1e-6)
    return out.reshape(t, h, d).astype(q.dtype)


class LinearAttention(AbstractAttention):
    """Linear attention that reuses a pretrained `Attention`'s projections, norms and RoPE (a learnable,
    identity-initialised feature map per KV head). Same interface as `Attention`, KV cache included.

    Its own core follows XLA's rounding: under `Invariant` numerics it cannot promise shape-independent sums, so
    switching a model that holds one to `"invariant"` raises `PolicyError` naming it.
    """

    attention: Attention
    feature_map: Float[Array, "kv_heads head_dim features"]
    numerics: Numerics

    def __init__(self, attention: Attention):
        self.attention = attention
        eye = jnp.eye(attention.head_dim, dtype=attention.o_proj.weight.dtype)
        self.feature_map = jnp.broadcast_to(eye, (attention.num_kv_heads,) + eye.shape)
        self.numerics = attention.numerics

    def refuses(self, policy: Policy) -> str | None:
        if isinstance(policy, Invariant):
            return ("its kernel (feature maps, then sums over keys) has no shape-invariant form; run it under 'xla' "
                    "or 'torch_cpu'")
        return None

    def _out(
        self,
        q: Float[Array, "q_seq heads head_dim"],
        k: Float[Array, "kv_seq kv_heads head_dim"],
        v: Float[Array, "kv_seq kv_heads head_dim"],
        mask: Bool[Array, "q_seq kv_seq"],
    ) -> Float[Array, "q_seq hidden"]:
        out = linear_attention(q, k, v, mask, self.feature_map)
        a = self.attention
        return a.o_proj(out.reshape(q.shape[0], a.num_heads * a.head_dim))

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """`band` is ignored: the masked form honours any mask."""
        k, v = self.attention.keys_values(x, positions)
        return self._out(self.attention.queries(x, positions), k, v, mask)

    def with_cache(
        self,
        x: Float[Array, "chunk hidden"],
        positions: Int[Array, " chunk"],
        kv: LayerCache,
        ctx: CacheContext,
    ) -> tuple[Float[Array, "chunk hidden"], LayerCache]:
        """The cache holds the same keys/values as for softmax attention (see `Attention.with_cache`)."""
        a = self.attention
        k, v, mask, _, kv = kv.update(a.finish_kv, *a.raw_kv(x), positions, ctx)
        return self._out(a.queries(x, positions), k, v, mask), kv
