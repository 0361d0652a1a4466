"""Prefill and decode steps over a `KVCache` (cache layout and masks in cache.py).

Both functions take one sequence and its cache and return `(logits of the last token, new cache)` (and a
`TapResult` third when `taps=` is given: reads and writes of the residual stream as in the whole-sequence forward,
`model/taps.py`). They are pure: the old cache goes in, a new one comes out. The jitted entry points here do not
donate the cache (a caller may keep it as a snapshot, e.g. to `truncate` back to); the generation driver donates
the caches it owns.

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

from ..utils.checks import check_shape, check_value
from .cache import KVCache
from .masks import MaskMode
from .media import InputArray, Media
from .taps import TapResult, Taps, run_with_cache


def forward_with_cache(
    model: eqx.Module,  # a g4.Gemma4 (model.py imports this module)
    input_ids: Int[InputArray, " chunk"] | None,
    cache: KVCache,
    *,
    inputs_embeds: Float[Array, "chunk hidden"] | None = None,
    positions: Int[InputArray, " chunk"] | None = None,
    attention_mask: Bool[InputArray, " chunk"] | Int[InputArray, " chunk"] | None = None,
    mm_token_type_ids: Int[InputArray, " chunk"] | None = None,
    mask_mode: MaskMode = "intended",
    media: Media | None = None,
    validate: bool = True,
    taps: Taps | None = None,
    **media_kwargs,
) -> tuple[Float[Array, "chunk hidden"], KVCache] | tuple[Float[Array, "chunk hidden"], KVCache, TapResult]:
    """Hidden states of a chunk of new tokens after the final norm `model.norm` (`model.logits_from_hidden` of
    them are the logits), and the cache with the chunk written into it.

    Give either `input_ids` (and the chunk's media) or ready `inputs_embeds` `[chunk, hidden]` (e.g. one slice of
    a whole multimodal prompt embedded at once, which is how chunked prefill keeps soft tokens in order; give its
    `mm_token_type_ids` then). `validate=False` skips the input checks of `model.embed` (the per-token step).
    `taps` (`g4.Taps`, values `[writes, chunk, hidden]` or `[writes, hidden]`): applied to the chunk's residual
    stream; then returns `(h, cache, TapResult)`, attention reads over the cache's `max_len` slots.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    media = Media.of(media, **media_kwargs)
    if inputs_embeds is None:
        check_shape("input_ids", input_ids, (None,), "(one sequence; vmap for a batch)")
    else:
        hidden = model.config.text.hidden_size
        if np.ndim(inputs_embeds) != 2 or np.shape(inputs_embeds)[1] != hidden:
            seq = np.shape(inputs_embeds)[0] if np.ndim(inputs_embeds) == 2 else "chunk"
            raise ValueError(f"inputs_embeds: expected shape [{seq}, {hidden}] (chunk, hidden_size), found "
                             f"{list(np.shape(inputs_embeds))}")
    t = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
    if t > cache.max_len:
        raise ValueError(f"input_ids: a chunk of {t} tokens does not fit a cache of max_len {cache.max_len}")
    types_from = None if inputs_embeds is not None or media.empty else input_ids
    positions, chunk_valid, blocks = model.token_inputs(t, positions, attention_mask, mm_token_type_ids,
                                                        cache.next_position + jnp.arange(t), types_from)
    h = model.embed(input_ids, media=media, validate=validate) if inputs_embeds is None else inputs_embeds
    h = check_value(h, cache.length + t > cache.max_len,
                    lambda: f"KVCache: writing {t} more tokens exceeds max_len {cache.max_len}; "
                            "allocate a larger cache")
    ctx, cache = cache.begin_chunk(positions, chunk_valid, blocks, mask_mode,
                                   ordered_ring=model.numerics.shape_invariant)
    if taps is None:
        h, kv = model.layers.with_cache(h, positions, cache.layers, ctx)
        return model.norm(h), eqx.tree_at(lambda c: c.layers, cache, kv)
    if taps.empty:
        h, kv = model.layers.with_cache(h, positions, cache.layers, ctx)
        tapped = TapResult(residual=None, attention=None)
    else:
        h, kv, tapped = run_with_cache(model.layers, h, positions, cache.layers, ctx, cache.max_len, taps)
    return model.norm(h), eqx.tree_at(lambda c: c.layers, cache, kv), tapped


def prefill(model: eqx.Module, input_ids: Int[InputArray, " chunk"] | None, cache: KVCache,
            **kwargs) -> tuple[Float[Array, " vocab"], KVCache] | tuple[Float[Array, " vocab"], KVCache, TapResult]:
    """Write a prompt (or a chunk of one) into the cache; logits of its last token (and the `TapResult` with
    `taps=`)."""
    out = forward_with_cache(model, input_ids, cache, **kwargs)
    return (model.logits_from_hidden(out[0][-1]),) + tuple(out[1:])


def decode_step(model: eqx.Module, token: Int[InputArray, ""], cache: KVCache, taps: Taps | None = None
                ) -> tuple[Float[Array, " vocab"], KVCache] | tuple[Float[Array, " vocab"], KVCache, TapResult]:
    """One new token at the cache's next slot and position; its logits (and the `TapResult` with `taps`)."""
    if taps is None:
        h, cache = forward_with_cache(model, jnp.reshape(token, (1,)), cache, validate=False)
        return model.logits_from_hidden(h[0]), cache
    h, cache, tapped = forward_with_cache(model, jnp.reshape(token, (1,)), cache, validate=False, taps=taps)
    return model.logits_from_hidden(h[0]), cache, tapped


# Jitted entry points, compiled once per shape; the cache is not donated (see the module docstring).
@functools.partial(jax.jit, static_argnames=("mask_mode",))
def prefill_jitted(model, input_ids, cache, mask_mode="intended", **kwargs):
    return prefill(model, input_ids, cache, mask_mode=mask_mode, **kwargs)


@jax.jit
def decode_step_jitted(model, token, cache, taps=None):
    return decode_step(model, token, cache, taps)


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
