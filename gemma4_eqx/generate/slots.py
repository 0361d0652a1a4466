"""The compiled programs of the continuous-batching engine (`generate.engine`): the slotted decode state (every
slot a row of one KV cache), a decode chunk over the slots in which each row samples from its own key with its own
settings, one request's prefill into a fresh row, and writing a row into a slot in place."""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from ..model.cache import KVCache
from .inputs import is_ordered
from .loop import DecodeState, batched_decode_step, decode_chunk, finish_step, prefill_rows
from .sampling import SamplingParams, choose_rows


def park_finished(cache: KVCache, done) -> KVCache:
    """Rows that are done write their (ignored) next token at slot 0: an idle row never runs past its cache."""
    zero = lambda x: jnp.where(done, jnp.zeros_like(x), x)
    return eqx.tree_at(lambda c: (c.length, c.next_position), cache, (zero(cache.length), zero(cache.next_position)))


def slot_step(model, state: DecodeState, params: SamplingParams):
    """The engine's per-step function (`decode_chunk(step=slot_step)`): every row feeds its last token and draws
    the next from its own key, as `sample_step` does for a one-row batch (split the key, then the draw key of
    `choose`), with its own settings."""
    cache = park_finished(state.cache, state.done)
    logits, cache = batched_decode_step(model, cache, state.token)
    keys = jax.vmap(jax.random.split)(state.key)  # [rows, 2]: (the row's next key, this step's key)
    draw = jax.vmap(lambda k: jax.random.split(k, 1)[0])(keys[:, 1])
    choice = choose_rows(logits, draw, params, ordered=is_ordered(model))
    choice, done, count = finish_step(choice, state.done, state.count, state.max_new, params)
    return DecodeState(cache, choice.token, done, count, state.max_new, keys[:, 0]), choice


def _blank(model, key, rows: int, max_len: int, cache_dtype, raw_keys: bool) -> DecodeState:
    cache = KVCache.init(model.config, max_len=max_len, dtype=cache_dtype, raw_keys=raw_keys)
    cache = eqx.tree_at(lambda c: c.layers, cache, model.layers.own_cache_layout(cache.layers))
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (rows,) + x.shape), cache)
    zeros = jnp.zeros((rows,), jnp.int32)
    return DecodeState(cache, zeros, jnp.ones((rows,), bool), zeros, zeros, jax.random.split(key, rows))


@functools.partial(jax.jit, static_argnames=("slots", "max_len", "cache_dtype", "raw_keys"))
def empty_slots(model, key, *, slots: int, max_len: int, cache_dtype, raw_keys: bool) -> DecodeState:
    """Every slot free (done), each with an empty cache of `max_len` slots in the model's own layout."""
    return _blank(model, key, slots, max_len, cache_dtype, raw_keys)


@functools.partial(jax.jit, static_argnames=("max_len", "cache_dtype", "raw_keys"))
def blank_row(model, key, *, max_len: int, cache_dtype, raw_keys: bool) -> DecodeState:
    """One done row shaped like `prefill_rows`' output (shared `max_new` and key): written over a cancelled slot."""
    state = _blank(model, key, 1, max_len, cache_dtype, raw_keys)
    return dataclasses.replace(state, max_new=jnp.zeros((), jnp.int32), key=key)


@functools.partial(jax.jit, donate_argnames=("state",))
def place_row(state: DecodeState, row: DecodeState, slot) -> DecodeState:
    """`state` with slot `slot` replaced by the one-row `row` (a prefilled request, or a blank done row)."""
    row = dataclasses.replace(row, max_new=jnp.reshape(row.max_new, (1,)), key=jnp.reshape(row.key, (1,)))
    return jax.tree.map(lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, 0), state, row)


# The engine's calls of the loop's programs take the model as its flat leaves and a static treedef: flattening the
# Equinox modules of the model was about half of each call's dispatch (0.9 -> 0.5 ms on the small checkpoint,
# benchmarks/RESULTS.md), paid on every decode chunk and every prefill.
@functools.partial(jax.jit, static_argnames=("treedef", "size"), donate_argnames=("state",))
def decode_slots(leaves, treedef, state: DecodeState, params: SamplingParams, steps, until_freed, *, size: int):
    """`loop.decode_chunk` over the slots with `slot_step`."""
    return decode_chunk(jax.tree.unflatten(treedef, leaves), state, params, steps, step=slot_step, size=size,
                        until_freed=until_freed)


@functools.partial(jax.jit, static_argnames=("treedef", "chunk", "max_len", "cache_dtype", "raw_keys"))
def prefill_one(leaves, treedef, batch: dict, n_chunks, max_new, key, params: SamplingParams, *, chunk: int,
                max_len: int, cache_dtype, raw_keys: bool):
    """`loop.prefill_rows` of one request into a fresh one-row cache."""
    return prefill_rows(jax.tree.unflatten(treedef, leaves), None, batch, n_chunks, max_new, key, params,
                        chunk=chunk, bounds=None, max_len=max_len, mask_mode="intended", cache_dtype=cache_dtype,
                        raw_keys=raw_keys)
