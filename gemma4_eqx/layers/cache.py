"""The per-layer KV cache kinds: each run of decoder layers holds one entry that owns its own read and write
(`LayerCache.update`). The whole-model container, its slot bookkeeping and masks are `model.cache.KVCache`.

- `RingKV` (sliding layers): a ring buffer of `min(sliding_window + spare, max_len)` slots.
- `FullKV` (full layers): every slot, finished keys and values.
- `RawKeyKV` (full layers whose values are the raw keys, `attention_k_eq_v`): the one raw key projection, with
  `k_norm` + RoPE and `v_norm` applied when reading.
- `RingKV8`, `FullKV8`, `RawKeyKV8`: the same holding int8 codes with an fp32 scale per token and KV head.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Int8

# `finish(raw_k, raw_v or None, positions) -> (k, v)`: the attention's k_norm + RoPE and v_norm.
Finish = Callable[..., tuple[Array, Array]]


class CacheContext(eqx.Module):
    """What every layer of one chunk needs to read and write the cache, computed once per chunk
    (`KVCache.begin_chunk`)."""

    start: Int[Array, ""]  # the chunk's first slot
    full_positions: Int[Array, " max_len"]  # RoPE position of every slot, the chunk included
    full_mask: Bool[Array, "chunk max_len"]
    sliding_mask: Bool[Array, "chunk ring_plus_chunk"]
    ring_write: Int[Array, " written"]  # ring entries the chunk's last tokens go to
    ring_order: Int[Array, " ring"] | None  # ring entries oldest first (banded or ordered reads), else None
    sliding_slots: Int[Array, " ring_plus_chunk"] | None = None  # the slot of each key a sliding layer reads (-1 =
    # an empty ring entry): what attention reads of the cached path are scattered by (`model.taps`)
    band: int | None = eqx.field(static=True, default=None)  # sliding layers may attend in bands of this size


class LayerCache(eqx.Module):
    """One run of layers' cached tensors; `update` writes a chunk and returns what the chunk attends over."""

    @abc.abstractmethod
    def update(
        self,
        finish: Finish,
        raw_k: Float[Array, "chunk kv_heads head_dim"],
        raw_v: Float[Array, "chunk kv_heads head_dim"] | None,
        positions: Int[Array, " chunk"],
        ctx: CacheContext,
    ) -> tuple[Float[Array, "keys kv_heads head_dim"], Float[Array, "keys kv_heads head_dim"],
               Bool[Array, "chunk keys"], int | None, LayerCache]:
        """(keys, values, mask, band, updated entry) for a chunk whose raw projections are `raw_k`, `raw_v`."""


class RingKV(LayerCache):
    """Sliding layers: post-norm, post-RoPE keys and post-`v_norm` values of the ring's slots."""

    k: Float[Array, "*stack ring kv_heads head_dim"]
    v: Float[Array, "*stack ring kv_heads head_dim"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        # The chunk attends over [ring entries, chunk], then its last `ring` tokens are written into the ring.
        k_new, v_new = finish(raw_k, raw_v, positions)
        ring_k, ring_v = (self.k, self.v) if ctx.ring_order is None else (self.k[ctx.ring_order], self.v[ctx.ring_order])
        m = ctx.ring_write.shape[0]
        keys, values = jnp.concatenate([ring_k, k_new]), jnp.concatenate([ring_v, v_new])
        # The ring is written after the chunk's keys and values are read from it: passing both through one barrier
        # orders the two, so the write can happen in place (vmapped over the engine's slots, XLA:CPU otherwise
        # copied every sliding layer's ring twice per decode step: benchmarks/RESULTS.md).
        keys, values, ring_k_old, ring_v_old = jax.lax.optimization_barrier((keys, values, self.k, self.v))
        new = RingKV(k=ring_k_old.at[ctx.ring_write].set(k_new[-m:]), v=ring_v_old.at[ctx.ring_write].set(v_new[-m:]))
        return keys, values, ctx.sliding_mask, ctx.band, new


class FullKV(LayerCache):
    """Full layers: finished keys and values of every slot."""

    k: Float[Array, "*stack slots kv_heads head_dim"]
    v: Float[Array, "*stack slots kv_heads head_dim"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        k_new, v_new = finish(raw_k, raw_v, positions)
        k = jax.lax.dynamic_update_slice_in_dim(self.k, k_new.astype(self.k.dtype), ctx.start, axis=0)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, v_new.astype(self.v.dtype), ctx.start, axis=0)
        # The written cache is materialised once: without the barrier XLA:CPU fused the write into both of its
        # readers (the next state and the attention product) and copied the layer's whole cache every decode step.
        k, v = jax.lax.optimization_barrier((k, v))
        return k, v, ctx.full_mask, None, FullKV(k=k, v=v)


class RawKeyKV(LayerCache):
    """Full layers whose values are their raw keys: the raw key projection of every slot, finished on read."""

    raw: Float[Array, "*stack slots kv_heads head_dim"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        raw = jax.lax.dynamic_update_slice_in_dim(self.raw, raw_k.astype(self.raw.dtype), ctx.start, axis=0)
        raw = jax.lax.optimization_barrier(raw)  # see FullKV.update
        k, v = finish(raw, None, ctx.full_positions)
        return k, v, ctx.full_mask, None, RawKeyKV(raw=raw)


# ---- int8 kinds (`KVCache.init(..., int8=True)`) ---------------------------------------------------------------
def quantize_kv(x: Float[Array, "*lead heads head_dim"]) -> tuple[Int8[Array, "*lead heads head_dim"],
                                                                Float[Array, "*lead heads 1"]]:
    """Symmetric int8 codes with one fp32 scale per token and head (`max|x| / 127` over head_dim)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127, 1.0)
    return jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale


def dequantize_kv(q: Int8[Array, "*lead heads head_dim"], scale: Float[Array, "*lead heads 1"],
                  dtype) -> Float[Array, "*lead heads head_dim"]:
    return (q.astype(jnp.float32) * scale).astype(dtype)


class RingKV8(LayerCache):
    """`RingKV` holding int8 keys and values (per token and head scales); the chunk attends over the dequantized
    ring and its own exact keys, as `RingKV` does over its stored ones."""

    k: Int8[Array, "*stack ring kv_heads head_dim"]
    k_scale: Float[Array, "*stack ring kv_heads 1"]
    v: Int8[Array, "*stack ring kv_heads head_dim"]
    v_scale: Float[Array, "*stack ring kv_heads 1"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        k_new, v_new = finish(raw_k, raw_v, positions)
        order = (lambda a: a) if ctx.ring_order is None else (lambda a: a[ctx.ring_order])
        ring_k = dequantize_kv(order(self.k), order(self.k_scale), k_new.dtype)
        ring_v = dequantize_kv(order(self.v), order(self.v_scale), v_new.dtype)
        m = ctx.ring_write.shape[0]
        (kq, ks), (vq, vs) = quantize_kv(k_new[-m:]), quantize_kv(v_new[-m:])
        w = ctx.ring_write
        new = RingKV8(k=self.k.at[w].set(kq), k_scale=self.k_scale.at[w].set(ks), v=self.v.at[w].set(vq),
                      v_scale=self.v_scale.at[w].set(vs))
        return (jnp.concatenate([ring_k, k_new]), jnp.concatenate([ring_v, v_new]), ctx.sliding_mask, ctx.band, new)


class FullKV8(LayerCache):
    """`FullKV` holding int8 keys and values (per token and head scales), dequantized on read."""

    k: Int8[Array, "*stack slots kv_heads head_dim"]
    k_scale: Float[Array, "*stack slots kv_heads 1"]
    v: Int8[Array, "*stack slots kv_heads head_dim"]
    v_scale: Float[Array, "*stack slots kv_heads 1"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        k_new, v_new = finish(raw_k, raw_v, positions)
        dus = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, ctx.start, axis=0)
        (kq, ks), (vq, vs) = quantize_kv(k_new), quantize_kv(v_new)
        new = FullKV8(k=dus(self.k, kq), k_scale=dus(self.k_scale, ks), v=dus(self.v, vq),
                      v_scale=dus(self.v_scale, vs))
        return (dequantize_kv(new.k, new.k_scale, k_new.dtype), dequantize_kv(new.v, new.v_scale, v_new.dtype),
                ctx.full_mask, None, new)


class RawKeyKV8(LayerCache):
    """`RawKeyKV` holding the raw keys in int8 (per token and head scales), dequantized and finished on read."""

    raw: Int8[Array, "*stack slots kv_heads head_dim"]
    raw_scale: Float[Array, "*stack slots kv_heads 1"]

    def update(self, finish, raw_k, raw_v, positions, ctx):
        q, sc = quantize_kv(raw_k)
        raw = jax.lax.dynamic_update_slice_in_dim(self.raw, q, ctx.start, axis=0)
        raw_scale = jax.lax.dynamic_update_slice_in_dim(self.raw_scale, sc, ctx.start, axis=0)
        k, v = finish(dequantize_kv(raw, raw_scale, raw_k.dtype), None, ctx.full_positions)
        return k, v, ctx.full_mask, None, RawKeyKV8(raw=raw, raw_scale=raw_scale)
