"""Self-attention for both layer kinds.

Sliding layers: GQA, `head_dim` 256, 8 KV heads, own `v_proj`. Full (global) layers: MQA, `head_dim` 512,
one KV head and no `v_proj`: the values are the *raw* key projection (before `k_norm` and RoPE).
Both: q/k RMSNorm with weights, scale-free `v_norm`, RoPE on q and k only, attention scale 1.0.

`AbstractAttention` is the interface the decoder layer calls (`__call__` over a whole sequence, `with_cache` over a
chunk and its KV-cache entry); `Attention` (softmax, the checkpoint's) and `layers.linear_attention.
LinearAttention` (the surgery example) are its final implementations. Which softmax kernel runs is the layer's
`kernel` policy (`XLAKernel` default, `CuDNNKernel`, `AutoKernel`: `layers/policy.py`, kernels in
`layers/kernels.py`), under its `numerics` policy (`Invariant` attends with its own ordered kernel).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import LayerGeometry, RopeConfig
from .cache import CacheContext, LayerCache
from .linear import Linear
from .norm import RMSNorm
from .policy import XLA, AttentionKernel, Numerics, Policy, XLAKernel
from .rope import inv_frequencies, rope_cos_sin


class AbstractAttention(eqx.Module):
    """What a decoder layer needs from its attention. Implementations are final (`Attention`, `LinearAttention`).

    `__call__` attends over the whole sequence with the given mask; `band` says the mask is a pure sliding window
    of that size (text-only sliding layers), which an implementation may use or ignore. `with_cache` attends a
    chunk of new tokens over its KV-cache entry plus themselves, and returns the entry with the chunk written
    (`cache.LayerCache.update` reads and writes it).
    """

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """Attention output over the whole sequence."""

    @abc.abstractmethod
    def with_cache(
        self,
        x: Float[Array, "chunk hidden"],
        positions: Int[Array, " chunk"],
        kv: LayerCache,
        ctx: CacheContext,
    ) -> tuple[Float[Array, "chunk hidden"], LayerCache]:
        """Attention output of a chunk over the cache and itself, and the updated cache entry."""


class Attention(AbstractAttention):
    """Softmax attention with the checkpoint's projections (`Gemma4UnifiedTextAttention`)."""

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
    numerics: Numerics
    kernel: AttentionKernel

    def __init__(self, hidden_size: int, num_heads: int, geometry: LayerGeometry, *, eps: float,
                 key: PRNGKeyArray, std: float = 0.02, dtype=jnp.float32, numerics: Numerics = XLA(),
                 kernel: AttentionKernel = XLAKernel()):
        kq, kk, kv, ko = jax.random.split(key, 4)
        hd, nkv = geometry.head_dim, geometry.num_key_value_heads
        linear = lambda n_in, n_out, k: Linear(n_in, n_out, key=k, std=std, dtype=dtype, numerics=numerics)
        self.q_proj = linear(hidden_size, num_heads * hd, kq)
        self.k_proj = linear(hidden_size, nkv * hd, kk)
        self.v_proj = linear(hidden_size, nkv * hd, kv) if geometry.has_v_proj else None
        self.o_proj = linear(num_heads * hd, hidden_size, ko)
        self.q_norm = RMSNorm(hd, eps=eps, dtype=dtype, numerics=numerics)
        self.k_norm = RMSNorm(hd, eps=eps, dtype=dtype, numerics=numerics)
        self.v_norm = RMSNorm(hd, eps=eps, with_scale=False, numerics=numerics)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, nkv, hd
        self.rope = geometry.rope
        self.numerics, self.kernel = numerics, kernel

    def refuses(self, policy: Policy) -> str | None:
        """The numerics and kernel policies must agree (`Invariant` needs the XLA kernel)."""
        if isinstance(policy, Numerics):
            return policy.refuses_kernel(self.kernel)
        if isinstance(policy, AttentionKernel):
            return self.numerics.refuses_kernel(policy)
        return None

    def rope_tables(self, positions: Int[Array, " seq"], dtype):
        return rope_cos_sin(positions, inv_frequencies(self.rope, self.head_dim), dtype)

    def queries(
        self, x: Float[Array, "seq hidden"], positions: Int[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        q = self.q_proj(x).reshape(x.shape[0], self.num_heads, self.head_dim)
        cos, sin = self.rope_tables(positions, x.dtype)
        return self.numerics.rope(self.q_norm(q), cos, sin)

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
        return self.numerics.rope(self.k_norm(raw_k), cos, sin), self.v_norm(raw_k if raw_v is None else raw_v)

    def keys_values(
        self, x: Float[Array, "seq hidden"], positions: Int[Array, " seq"]
    ) -> tuple[Float[Array, "seq kv_heads head_dim"], Float[Array, "seq kv_heads head_dim"]]:
        """Post-norm, post-RoPE keys and post-`v_norm` values."""
        return self.finish_kv(*self.raw_kv(x), positions)

    def attend(
        self,
        q: Float[Array, "q_seq heads head_dim"],
        k: Float[Array, "kv_seq kv_heads head_dim"],
        v: Float[Array, "kv_seq kv_heads head_dim"],
        mask: Bool[Array, "q_seq kv_seq"],
        band: int | None,
    ) -> Float[Array, "q_seq hidden"]:
        """The softmax core (the policies' kernel) and the output projection."""
        out = self.numerics.attend(q, k, v, mask, band, self.kernel)
        return self.o_proj(out.reshape(q.shape[0], self.num_heads * self.head_dim))

    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        k, v = self.keys_values(x, positions)
        return self.attend(self.queries(x, positions), k, v, mask, band)

    def with_cache(
        self,
        x: Float[Array, "chunk hidden"],
        positions: Int[Array, " chunk"],
        kv: LayerCache,
        ctx: CacheContext,
    ) -> tuple[Float[Array, "chunk hidden"], LayerCache]:
        k, v, mask, band, kv = kv.update(self.finish_kv, *self.raw_kv(x), positions, ctx)
        return self.attend(self.queries(x, positions), k, v, mask, band), kv
