"""The KV cache: an explicit, immutable pytree with static shapes (one sequence; `vmap` for a batch).

`KVCache` holds one entry per run of decoder layers, of a kind that owns its own read and write
(`layers.cache`: `RingKV` for sliding layers, `FullKV`, `RawKeyKV` for keys-as-values layers, and their int8
forms), plus the slot bookkeeping shared by all layers of a kind: which absolute slot, position and padding flag
each entry holds. `begin_chunk` computes, once per chunk, the masks and ring indices every layer reads
(`CacheContext`); the per-layer tensors are stacked exactly like the decoder stack's runs
(`[repeats, run_length, ...]`) so the two scan together. Masks use cache slot indices, as transformers does.

`RawKeyKV` (the default for keys-as-values layers, the 12B's global layers) stores half the bytes of `FullKV` and
gives the same numbers; the price is that every decode step normalises and rotates the whole context of those
layers again, so at long contexts on a GPU, where decode is bound by bytes moved, `raw_keys=False` keeps `FullKV`.
`spare` extra ring slots let `KVCache.truncate` roll back up to `spare + 1` tokens without losing a key the window
still needs.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ..config import Gemma4Config
from ..layers.cache import CacheContext, FullKV, FullKV8, LayerCache, RawKeyKV, RawKeyKV8, RingKV, RingKV8
from ..layers.kinds import LayerKind, layer_pattern, layer_repeats
from ..utils.checks import check_value, is_concrete
from ..utils.dtypes import float_dtype
from .masks import MaskMode, layer_masks
from .sharding import commit_like


class KVCache(eqx.Module):
    layers: tuple[LayerCache, ...]  # aligned with the stock DecoderStack's runs
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

    @property
    def spare(self) -> int:
        """Ring slots beyond the window: `truncate` can roll back up to `spare + 1` tokens."""
        return self.ring_size - min(self.sliding_window, self.max_len)

    @classmethod
    def init(cls, config: Gemma4Config, *, max_len: int, dtype=jnp.bfloat16, batch: int | None = None,
             raw_keys: bool = True, spare: int = 0, int8: bool = False) -> KVCache:
        """An empty cache for sequences of up to `max_len` slots (prompt, padding and new tokens together).

        `batch=None` gives one sequence's cache (the Equinox convention); `batch=B` stacks B of them for `vmap`.
        `raw_keys`: for keys-as-values layers, store the raw key projection once (default) rather than K and V.
        `spare`: ring slots beyond the sliding window, so that `truncate` can roll back up to `spare + 1` tokens
        (speculative decoding, a chat session re-rendering its last reply).
        `int8`: store keys and values as int8 codes with an fp32 scale per token and KV head (`RingKV8`,
        `FullKV8`, `RawKeyKV8`), dequantized to the activations' dtype on read: about half a bf16 cache.
        """
        if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len <= 0:
            raise ValueError(f"max_len: expected a positive number of slots, found {max_len!r}")
        dtype = float_dtype(dtype, "dtype", "int8 codes with a scale per token are KVCache.init(..., int8=True)")
        if not isinstance(spare, (int, np.integer)) or spare < 0:
            raise ValueError(f"spare: expected a number of extra ring slots >= 0, found {spare!r}")
        t = config.text
        repeats = layer_repeats(t.layer_types)
        ring = min(t.sliding_window + spare, max_len)
        layers: list[LayerCache] = []
        for kind, length in layer_pattern(t.layer_types):
            g = t.layer_geometry_for_type(kind)
            slots = ring if kind == LayerKind.SLIDING else max_len
            zeros = lambda: jnp.zeros((repeats, length, slots, g.num_key_value_heads, g.head_dim), dtype)
            if int8:
                codes = lambda: jnp.zeros((repeats, length, slots, g.num_key_value_heads, g.head_dim), jnp.int8)
                scales = lambda: jnp.ones((repeats, length, slots, g.num_key_value_heads, 1), jnp.float32)
                if kind == LayerKind.SLIDING:
                    layers.append(RingKV8(k=codes(), k_scale=scales(), v=codes(), v_scale=scales()))
                elif not g.has_v_proj and raw_keys:
                    layers.append(RawKeyKV8(raw=codes(), raw_scale=scales()))
                else:
                    layers.append(FullKV8(k=codes(), k_scale=scales(), v=codes(), v_scale=scales()))
                continue
            if kind == LayerKind.SLIDING:
                layers.append(RingKV(k=zeros(), v=zeros()))
            elif not g.has_v_proj and raw_keys:
                layers.append(RawKeyKV(raw=zeros()))
            else:
                layers.append(FullKV(k=zeros(), v=zeros()))
        cache = cls(
            layers=tuple(layers),
            length=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((), jnp.int32),
            full_valid=jnp.zeros((max_len,), bool),
            full_positions=jnp.zeros((max_len,), jnp.int32),
            ring_slots=jnp.full((ring,), -1, jnp.int32),
            ring_valid=jnp.zeros((ring,), bool),
            max_len=int(max_len),
            sliding_window=t.sliding_window,
        )
        if batch is not None:
            cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), cache)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    # ---- one chunk -------------------------------------------------------------------------------
    def begin_chunk(
        self,
        positions: Int[Array, " chunk"],
        chunk_valid: Bool[Array, " chunk"],
        blocks: Int[Array, " chunk"] | None,
        mask_mode: MaskMode,
        ordered_ring: bool = False,
    ) -> tuple[CacheContext, KVCache]:
        """The context every layer reads for a chunk written at the next slots, and the cache's bookkeeping with the
        chunk written (the layers' tensors are written by `LayerCache.update`).

        `blocks`: vision block ids of the chunk's tokens (None: no bidirectional block). `ordered_ring`: the sliding
        layers read the ring oldest first even when not banded (`Invariant` numerics).
        """
        t = positions.shape[0]
        start = self.length
        q_slots = start + jnp.arange(t)
        dus = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)
        full_valid = dus(self.full_valid, chunk_valid)
        full_positions = dus(self.full_positions, positions)
        full_slots = jnp.arange(self.max_len)
        full_blocks = None if blocks is None else dus(jnp.full((self.max_len,), -1, jnp.int32), blocks)
        full_mask = layer_masks(q_slots, full_slots, full_valid, self.sliding_window, blocks, full_blocks,
                                mask_mode)[LayerKind.FULL]
        ring = self.ring_size
        # A text-only chunk of more than one window (so more than two windows of keys with the ring's) attends in
        # bands (layers.kernels.banded_attention), which needs the ring's entries in slot order (-1 = empty sorts
        # first) and the ring to hold a whole window.
        banded = blocks is None and ring >= self.sliding_window and t > self.sliding_window
        band = self.sliding_window if banded else None
        ring_order = jnp.argsort(self.ring_slots) if banded or ordered_ring else None
        ring_slots = self.ring_slots if ring_order is None else self.ring_slots[ring_order]
        ring_entry_valid = self.ring_valid if ring_order is None else self.ring_valid[ring_order]
        ring_keys = jnp.concatenate([ring_slots, q_slots])
        ring_valid = jnp.concatenate([ring_entry_valid & (ring_slots >= 0), chunk_valid])
        ring_blocks = None if blocks is None else jnp.concatenate([jnp.full((ring,), -1, jnp.int32), blocks])
        sliding_mask = layer_masks(q_slots, ring_keys, ring_valid, self.sliding_window, blocks, ring_blocks,
                                   mask_mode)[LayerKind.SLIDING]
        m = min(t, ring)  # only the chunk's last `ring` tokens survive in the ring
        ring_write = (start + t - m + jnp.arange(m)) % ring
        ctx = CacheContext(start=start, full_positions=full_positions, full_mask=full_mask,
                           sliding_mask=sliding_mask, ring_write=ring_write, ring_order=ring_order, band=band,
                           sliding_slots=ring_keys)
        new = eqx.tree_at(
            lambda c: (c.length, c.next_position, c.full_valid, c.full_positions, c.ring_slots, c.ring_valid),
            self,
            ((start + t).astype(self.length.dtype), (positions[-1] + 1).astype(self.next_position.dtype),
             full_valid, full_positions,
             self.ring_slots.at[ring_write].set(q_slots[t - m:].astype(jnp.int32)),
             self.ring_valid.at[ring_write].set(chunk_valid[t - m:])))
        return ctx, new

    # ---- rolling back ----------------------------------------------------------------------------
    def truncate(self, length: int | Int[Array, ""]) -> KVCache:
        """The cache as it was after its first `length` slots: later slots are forgotten (one sequence; vmap
        it over a batch).

        Full layers keep every slot, so any earlier length works for them. The sliding layers' ring holds the
        last `ring_size` slots: rolling back `n = self.length - length` tokens keeps every key the window needs
        only while `n <= spare + 1` (or while the whole context still fits the ring); beyond that this raises
        (eagerly, or through `eqx.error_if` under jit). Make room with `KVCache.init(..., spare=k)`.
        """
        if isinstance(length, bool) or not jnp.issubdtype(jnp.result_type(length), jnp.integer):
            raise ValueError(f"length: expected an integer number of slots, found {length!r}"[:160])
        length = jnp.asarray(length, jnp.int32)
        if length.ndim != 0:
            raise ValueError(f"length: expected one slot count (vmap truncate over a batch), found shape "
                             f"{list(length.shape)}")
        bad_range = (length < 0) | (length > self.length)
        if is_concrete(bad_range, self.length) and bool(bad_range):
            raise ValueError(f"length: expected 0 <= length <= {int(self.length)} (the slots written), "
                             f"found {int(length)}")
        # Slots the window still needs after the roll-back: (length - window, length); the ring holds
        # [self.length - ring_size, self.length).
        oldest_held = self.length - self.ring_size
        needed_from = jnp.maximum(length - self.sliding_window + 1, 0)
        lost = (oldest_held > needed_from) & (length > 0)
        if is_concrete(lost, length, self.length) and bool(lost):
            raise ValueError(f"KVCache.truncate: rolling back from {int(self.length)} to {int(length)} slots loses "
                             f"sliding-window keys (the ring holds {self.ring_size} slots, {self.spare} beyond the "
                             f"window); roll back at most {self.spare + 1} tokens, or make the cache with "
                             f"KVCache.init(..., spare={int(self.length - length) - 1})")
        length = check_value(length, bad_range | lost,
                             lambda: "KVCache.truncate: length out of range or rolling back more tokens than the ring "
                                     "keeps (spare + 1)")
        keep_ring = (self.ring_slots >= 0) & (self.ring_slots < length)
        keep_full = jnp.arange(self.max_len) < length
        last = jnp.maximum(length - 1, 0)
        next_position = jnp.where(length > 0, self.full_positions[last] + 1, 0).astype(self.next_position.dtype)
        length = length.astype(self.length.dtype)
        if is_concrete(length, self.length):
            # A length made eagerly from a Python int is uncommitted; jit keys its programs on that, so the next
            # decode step would compile again: place it where the cache's own arrays live.
            length = commit_like(length, self)
        return eqx.tree_at(
            lambda c: (c.length, c.next_position, c.full_valid, c.full_positions, c.ring_slots, c.ring_valid),
            self,
            (length, next_position, self.full_valid & keep_full,
             jnp.where(keep_full, self.full_positions, 0), jnp.where(keep_ring, self.ring_slots, -1),
             self.ring_valid & keep_ring))


def cache_bytes(config: Gemma4Config, context: int, dtype=jnp.bfloat16, batch: int = 1, raw_keys: bool = True,
                int8: bool = False, spare: int = 0) -> int:
    """Bytes of a cache for `context` slots (and `spare` extra ring slots), computed from shapes only (nothing
    allocated)."""
    abstract = jax.eval_shape(lambda: KVCache.init(config, max_len=context, dtype=dtype, raw_keys=raw_keys,
                                                   int8=int8, spare=spare))
    return batch * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
