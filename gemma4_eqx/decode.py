"""Prefill and decode steps over a `KVCache` (spec §5 for the masks; cache layout in cache.py).

Both functions take one sequence and its cache and return `(logits of the last token, new cache)`. They are
pure: the old cache goes in, a new one comes out; the jitted entry points donate the old one, so XLA updates
it in place.

Masks use cache slot indices, as transformers does. Vision blocks (bidirectional on sliding layers) are found
within the chunk being prefilled, so a chunk boundary must not cut an image or a video frame in two
(`prefill_chunks` picks such boundaries).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._checks import check_shape, check_value
from .cache import KVCache
from .config import FULL, SLIDING
from .masks import MaskMode, layer_masks


class CacheContext(eqx.Module):
    """What every layer of one chunk needs to read and write the cache, computed once per chunk."""

    start: Int[Array, ""]
    full_positions: Int[Array, " max_len"]
    full_mask: Bool[Array, "chunk max_len"]
    sliding_mask: Bool[Array, "chunk ring_plus_chunk"]
    ring_write: Int[Array, " written"]
    ring_order: Int[Array, " ring"] | None  # ring entries by slot (banded or "invariant"), else None
    band: int | None = eqx.field(static=True, default=None)  # sliding layers may attend in bands of this size


def _context(cache: KVCache, positions, chunk_valid, blocks, mask_mode, oldest_first: bool = False
             ) -> tuple[CacheContext, KVCache]:
    """`oldest_first`: the sliding layers read the ring in slot order even when not banded (`"invariant"`)."""
    t = positions.shape[0]
    start = cache.length
    q_slots = start + jnp.arange(t)
    dus = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)
    full_valid = dus(cache.full_valid, chunk_valid)
    full_positions = dus(cache.full_positions, positions)
    full_slots = jnp.arange(cache.max_len)
    full_blocks = None if blocks is None else dus(jnp.full((cache.max_len,), -1, jnp.int32), blocks)
    full_mask = layer_masks(q_slots, full_slots, full_valid, cache.sliding_window, blocks, full_blocks,
                            mask_mode)[FULL]
    ring = cache.ring_size
    # A text-only chunk of more than two windows attends in bands (layers.attention.banded_attention), which
    # needs the ring's entries in slot order (-1 = empty sorts first).
    band = cache.sliding_window if blocks is None and ring == cache.sliding_window and t > 2 * ring else None
    ring_order = None if band is None and not oldest_first else jnp.argsort(cache.ring_slots)
    ring_slots = cache.ring_slots if ring_order is None else cache.ring_slots[ring_order]
    ring_entry_valid = cache.ring_valid if ring_order is None else cache.ring_valid[ring_order]
    ring_keys = jnp.concatenate([ring_slots, q_slots])
    ring_valid = jnp.concatenate([ring_entry_valid & (ring_slots >= 0), chunk_valid])
    ring_blocks = None if blocks is None else jnp.concatenate([jnp.full((ring,), -1, jnp.int32), blocks])
    sliding_mask = layer_masks(q_slots, ring_keys, ring_valid, cache.sliding_window, blocks, ring_blocks,
                               mask_mode)[SLIDING]
    m = min(t, ring)  # only the chunk's last `ring` tokens survive in the ring
    ring_write = (start + t - m + jnp.arange(m)) % ring
    ctx = CacheContext(start=start, full_positions=full_positions, full_mask=full_mask,
                       sliding_mask=sliding_mask, ring_write=ring_write, ring_order=ring_order, band=band)
    new = eqx.tree_at(
        lambda c: (c.length, c.next_position, c.full_valid, c.full_positions, c.ring_slots, c.ring_valid),
        cache,
        ((start + t).astype(cache.length.dtype), (positions[-1] + 1).astype(cache.next_position.dtype),
         full_valid, full_positions,
         cache.ring_slots.at[ring_write].set(q_slots[t - m:].astype(jnp.int32)), cache.ring_valid.at[ring_write].set(chunk_valid[t - m:])))
    return ctx, new


def forward_with_cache(
    model,
    input_ids: Int[Array, " chunk"] | None,
    cache: KVCache,
    *,
    inputs_embeds: Float[Array, "chunk hidden"] | None = None,
    positions: Int[Array, " chunk"] | None = None,
    attention_mask: Bool[Array, " chunk"] | Int[Array, " chunk"] | None = None,
    mm_token_type_ids: Int[Array, " chunk"] | None = None,
    mask_mode: MaskMode = "intended",
    **media,
) -> tuple[Float[Array, "chunk hidden"], KVCache]:
    """Final-norm hidden states of a chunk of new tokens, and the cache with the chunk written into it.

    Give either `input_ids` (and the chunk's media) or ready `inputs_embeds` (e.g. one slice of a whole
    multimodal prompt embedded at once, which is how chunked prefill keeps soft tokens in order).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        check_shape("input_ids", input_ids, (None,), "(one sequence; vmap for a batch)")
    t = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
    if t > cache.max_len:
        raise ValueError(f"input_ids: a chunk of {t} tokens does not fit a cache of max_len {cache.max_len}")
    positions, chunk_valid, blocks = model.token_inputs(t, positions, attention_mask, mm_token_type_ids,
                                                        cache.next_position + jnp.arange(t))
    h = model.embed(input_ids, **media) if inputs_embeds is None else inputs_embeds
    h = check_value(h, cache.length + t > cache.max_len,
                    lambda: f"KVCache: writing {t} more tokens exceeds max_len {cache.max_len}; "
                            "allocate a larger cache")
    ctx, cache = _context(cache, positions, chunk_valid, blocks, mask_mode,
                          oldest_first=model.numerics == "invariant")
    h, kv = model.layers.with_cache(h, positions, cache.layers, ctx)
    cache = eqx.tree_at(lambda c: c.layers, cache, kv)
    return model.norm(h), cache


def prefill(model, input_ids, cache, **kwargs) -> tuple[Float[Array, " vocab"], KVCache]:
    """Write a prompt (or a chunk of one) into the cache; logits of its last token."""
    h, cache = forward_with_cache(model, input_ids, cache, **kwargs)
    return model.logits_from_hidden(h[-1]), cache


def decode_step(model, token: Int[Array, ""], cache: KVCache) -> tuple[Float[Array, " vocab"], KVCache]:
    """One new token at the cache's next slot and position; its logits."""
    h, cache = forward_with_cache(model, jnp.reshape(token, (1,)), cache)
    return model.logits_from_hidden(h[0]), cache


# Jitted entry points: compiled once per shape, the cache donated (updated in place).
@functools.partial(jax.jit, static_argnames=("mask_mode",), donate_argnames=("cache",))
def prefill_jitted(model, input_ids, cache, mask_mode="intended", **kwargs):
    return prefill(model, input_ids, cache, mask_mode=mask_mode, **kwargs)


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode_step_jitted(model, token, cache):
    return decode_step(model, token, cache)


def prefill_chunks(mm_token_type_ids: np.ndarray | None, length: int, chunk_size: int) -> list[tuple[int, int]]:
    """Chunk boundaries of at most `chunk_size` tokens that never cut a vision block (grown to its end if needed).

    `mm_token_type_ids` may be `[seq]` or `[batch, seq]`; with a batch a cut must be safe in every row.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive number of tokens, found {chunk_size}")
    types = np.zeros(length, np.int64) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    is_vision = (types == 1) | (types == 2)
    if is_vision.ndim == 2:
        is_vision = is_vision.any(axis=0)
    bounds, start = [], 0
    while start < length:
        end = min(start + chunk_size, length)
        while end < length and is_vision[end] and is_vision[end - 1]:
            end += 1  # never split an image / video frame between two chunks
        bounds.append((start, end))
        start = end
    return bounds
