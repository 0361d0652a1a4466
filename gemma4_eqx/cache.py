"""The KV cache: an explicit, immutable pytree with static shapes (one sequence; `vmap` for a batch).

Sliding layers keep a ring buffer of `min(sliding_window, max_len)` slots, so their memory does not grow with the
context. Full layers keep every slot; when their values are the raw keys (`attention_k_eq_v`, the 12B's global
layers) the cache stores, by default, that one raw key projection and applies `k_norm` + RoPE and `v_norm` when
reading: half the bytes of storing K and V, and the same numbers (the same operations on the same inputs). The
price is that every decode step normalises and rotates the whole context of those layers again; at long contexts
on a GPU, where decode is bound by bytes moved, `raw_keys=False` stores the finished K and V instead (twice the
memory of those layers, nothing recomputed).

Slot bookkeeping (which absolute slot, position and padding flag each entry holds) is shared by all layers of a
kind; the per-layer tensors are stacked exactly like the decoder stack's runs (`[repeats, run_length, ...]`) so
the two scan together.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .config import FULL, SLIDING, Gemma4Config
from .layers.decoder import layer_pattern


class LayerKV(eqx.Module):
    """Cached tensors of one run of layers. Unused fields are None."""

    k: Float[Array, "*stack slots kv_heads head_dim"] | None = None  # post-norm, post-RoPE keys
    v: Float[Array, "*stack slots kv_heads head_dim"] | None = None  # post-v_norm values
    raw: Float[Array, "*stack slots kv_heads head_dim"] | None = None  # raw k projection (keys as values)


class KVCache(eqx.Module):
    layers: tuple[LayerKV, ...]  # aligned with DecoderStack.runs
    length: Int[Array, ""]  # slots written so far (= the slot index of the next token)
    next_position: Int[Array, ""]  # RoPE position of the next token
    full_valid: Bool[Array, " max_len"]  # slot holds a real (non-padding) token
    full_positions: Int[Array, " max_len"]  # RoPE position of each slot (needed to rotate raw keys on read)
    ring_slots: Int[Array, " ring"]  # absolute slot held by each ring entry, -1 = empty
    ring_valid: Bool[Array, " ring"]
    max_len: int = eqx.field(static=True)
    sliding_window: int = eqx.field(static=True)

    @property
    def ring_size(self) -> int:
        return self.ring_slots.shape[-1]

    @classmethod
    def init(cls, config: Gemma4Config, *, max_len: int, dtype=jnp.bfloat16, batch: int | None = None,
             raw_keys: bool = True) -> KVCache:
        """An empty cache for sequences of up to `max_len` slots (prompt, padding and new tokens together).

        `batch=None` gives one sequence's cache (the Equinox convention); `batch=B` stacks B of them for `vmap`.
        `raw_keys`: for keys-as-values layers, store the raw key projection once (default) rather than K and V.
        """
        if max_len <= 0:
            raise ValueError(f"max_len: expected a positive number of slots, found {max_len}")
        t = config.text
        pattern, repeats = layer_pattern(t.layer_types)
        ring = min(t.sliding_window, max_len)
        layers = []
        for layer_type, length in pattern:
            g = t.layer_geometry_for_type(layer_type)
            slots = ring if layer_type == SLIDING else max_len
            shape = (repeats, length, slots, g.num_key_value_heads, g.head_dim)
            if layer_type == FULL and not g.has_v_proj and raw_keys:
                layers.append(LayerKV(raw=jnp.zeros(shape, dtype)))
            else:
                layers.append(LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)))
        cache = cls(
            layers=tuple(layers),
            length=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((), jnp.int32),
            full_valid=jnp.zeros((max_len,), bool),
            full_positions=jnp.zeros((max_len,), jnp.int32),
            ring_slots=jnp.full((ring,), -1, jnp.int32),
            ring_valid=jnp.zeros((ring,), bool),
            max_len=max_len,
            sliding_window=t.sliding_window,
        )
        if batch is not None:
            cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), cache)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def cache_bytes(config: Gemma4Config, context: int, dtype=jnp.bfloat16, batch: int = 1, raw_keys: bool = True) -> int:
    """Bytes of a cache for `context` slots, computed from shapes only (nothing allocated)."""
    abstract = jax.eval_shape(lambda: KVCache.init(config, max_len=context, dtype=dtype, raw_keys=raw_keys))
    return batch * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
