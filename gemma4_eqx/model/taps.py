"""Taps: read the residual stream and attention probabilities out of the scanned decoder stack, and write into it.

    taps = g4.Taps(residual=(0, 3, 5), attention=(5,))
    logits, tapped = model(input_ids, taps=taps)
    tapped.residual      # [3, seq, hidden]: the residual stream after layers 0, 3 and 5 (in the order asked)
    tapped.attention     # [1, heads, seq, seq]: layer 5's attention probabilities (query, key)

    patch = g4.Taps(patch=(3,), values=tapped.residual[1:2], where=image_slots[None])
    logits, _ = model(corrupted_ids, taps=patch)  # layer 3's output replaced at `where`, the rest recomputed

    steer = g4.Taps(add=(3,), values=4.0 * direction)      # direction [hidden]: added at every position
    logits, _ = model(input_ids, taps=steer)
    g4.generate(model, ids, taps=steer)                    # ... and at every generated token (activation steering)

Semantics. Layer `i`'s *residual* is its output, the stream layer `i + 1` reads (the last layer's is the input of
the final norm `model.norm`; `g4.taps.logit_lens` turns residuals into logits). Two ways to write into it, both
at the positions `where` marks (all positions when `where` is None), before anything downstream sees the result:
*patch* at layer `i` **replaces** its output by the value (`h = v`), *add* **adds** the value to it (`h = h + v`,
activation steering). A layer is patched or added to, not both. `values` holds one row per written layer, the
patched layers first, then the added ones (`Taps.written`): either `[writes, seq, hidden]` (a value per position)
or `[writes, hidden]` (one vector for every position; the only form `g4.generate` takes, since it applies the write
to every prompt and generated token). A residual read at a written layer returns the written value. Attention
probabilities are the layer's softmax weights per query head, computed as `layers.kernels.dot_product_attention`
computes them (scores in the activation dtype, softmax in fp32, cast back): exactly what the default kernel
multiplies the values with; under another kernel or `numerics="invariant"` the same function with that kernel's
rounding left out.

The layers stay a `lax.scan` (one body per layer kind, `layers.decoder.scan_layers`): each layer step gets its flat
index and looks up, in small constant tables, whether to read or write, writing reads into `[n, ...]` buffers
carried through the scan, so only the asked-for layers are stored. Works under `jax.jit`, `jax.vmap` (vmap the model
call; `values` and `where` may carry the batch axis) and `jax.grad` (gradients flow into `values` and through the
residuals). `values` and `where` may be NumPy arrays. Attention reads compute the probabilities only at the layers
asked for (a `lax.cond`), except under `vmap`, where the cond becomes a select and every softmax layer computes
them. With no taps the model runs exactly the program it runs without this module (`tests/test_taps.py` compares
the jaxprs and lowered programs).

Where taps act: the whole-sequence forward (`model(...)`, `hidden_states`, `decode_hidden`; `run`) and cached
decoding (`model.prefill`, `model.decode_step`, `model.decode.forward_with_cache`, and through them `g4.generate(...,
taps=...)`; `run_with_cache`). In cached decoding the key axis of an attention read is the cache's slots
(`[reads, heads, chunk, max_len]`): slot `s` holds the token written `s`-th (padding included), whatever ring
entry a sliding layer keeps it in; slots the layer does not see (outside its window, not yet written) get 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..layers.attention import Attention
from ..layers.cache import CacheContext, LayerCache
from ..layers.decoder import DecoderLayer, DecoderStack, scan_layers
from ..layers.kinds import LayerKind
from ..layers.numerics import compute_dtype
from .media import InputArray


def _layer_tuple(name: str, layers: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(layers, (int, np.integer)):
        layers = (layers,)
    layers = list(layers)
    if any(isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) for i in layers):
        raise ValueError(f"{name}: expected layer indices (ints), found {tuple(layers)}")
    out = tuple(int(i) for i in layers)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: each layer may be listed once, found {out}")
    return out


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Taps(eqx.Module):
    """Which layers to read and write (static layer indices) and the values written (arrays).

    - `residual`: layers whose output (the residual stream after the layer) is read, in this order.
    - `attention`: layers whose attention probabilities are read, in this order.
    - `patch`: layers whose output is **replaced** by the value (`h = v`) at the positions `where` marks.
    - `add`: layers whose output gets the value **added** (`h = h + v`: activation steering) at `where`.
    - `values`: one row per written layer, `patch` layers first, then `add` layers (`written`): `[writes, seq,
      hidden]` (per position) or `[writes, hidden]` (the same vector at every position); with one written layer a
      `[hidden]` vector is accepted. In the model's activation dtype; NumPy arrays are accepted.
    - `where`: `[writes, seq]` bool, the positions written (None: all).
    Layer indices are flat (0 .. num_layers - 1), as in the checkpoint's names. Extra leading axes of `values` and
    `where` are batch axes (for `vmap`, or one row per prompt in `g4.generate`).
    """

    residual: tuple[int, ...] = eqx.field(static=True)
    attention: tuple[int, ...] = eqx.field(static=True)
    patch: tuple[int, ...] = eqx.field(static=True)
    add: tuple[int, ...] = eqx.field(static=True)
    values: Float[Array, "*batch writes seq hidden"] | Float[Array, "*batch writes hidden"] | None
    where: Bool[Array, "*batch writes seq"] | None

    def __init__(self, residual: Sequence[int] | int = (), attention: Sequence[int] | int = (),
                 patch: Sequence[int] | int = (),
                 values: Float[InputArray, "*batch writes seq hidden"] | Float[InputArray, "*batch writes hidden"]
                 | Float[InputArray, " hidden"] | None = None,
                 where: Bool[InputArray, "*batch writes seq"] | None = None,
                 add: Sequence[int] | int = ()):
        self.residual = _layer_tuple("residual", residual)
        self.attention = _layer_tuple("attention", attention)
        self.patch = _layer_tuple("patch", patch)
        self.add = _layer_tuple("add", add)
        both = sorted(set(self.patch) & set(self.add))
        if both:
            raise ValueError(f"patch, add: layers {both} are in both; a layer is either patched (replaced) or added "
                             "to")
        n = len(self.written)
        if n and values is None:
            what = " and ".join(w for w in (f"patching layers {self.patch}" if self.patch else "",
                                            f"adding at layers {self.add}" if self.add else "") if w)
            raise ValueError(f"values: {what} needs values [{n}, seq, hidden] or [{n}, hidden] (one row per written "
                             "layer, patched layers first)")
        if not n and (values is not None or where is not None):
            raise ValueError("values, where: given without `patch` or `add` (the layers they write)")
        if values is not None:
            values = jnp.asarray(values)  # NumPy values: indexed with traced layer slots inside the scan
            if values.ndim == 1 and n == 1:
                values = values[None]
            if not (values.ndim >= 2 and (values.shape[-2] == n or (values.ndim >= 3 and values.shape[-3] == n))):
                raise ValueError(f"values: expected shape [{n}, seq, hidden] or [{n}, hidden] (one row per written "
                                 f"layer, patched layers first; leading batch axes allowed), found "
                                 f"{_shape(values.shape)}")
        if where is not None:
            where = jnp.asarray(where)
            if where.dtype != jnp.bool_:
                raise ValueError(f"where: expected a bool mask [writes, seq], found dtype {where.dtype}")
            if where.ndim < 2 or where.shape[-2] != n:
                raise ValueError(f"where: expected shape [{n}, seq] (written layers, positions), found "
                                 f"{_shape(where.shape)}")
        self.values, self.where = values, where

    @property
    def written(self) -> tuple[int, ...]:
        """The layers `values` rows are for: `patch + add`."""
        return self.patch + self.add

    @property
    def reads(self) -> bool:
        """Whether anything is read (a `TapResult` with arrays comes back)."""
        return bool(self.residual or self.attention)

    @property
    def empty(self) -> bool:
        """Nothing to read or write: the model then runs its untapped program."""
        return not (self.residual or self.attention or self.patch or self.add)


class TapResult(eqx.Module):
    """What `Taps` read: `residual` `[len(taps.residual), seq, hidden]` and `attention`
    `[len(taps.attention), heads, seq, keys]` (query, key) in the order asked; None where nothing was asked. The keys
    are the sequence's positions in the whole-sequence forward and the cache's slots in cached decoding.
    `position(i)` drops the query axis (`seq`, `q`): what was read at one position."""

    residual: Float[Array, "residual_reads *seq hidden"] | None
    attention: Float[Array, "attention_reads heads *q k"] | None

    def position(self, i: int | Int[Array, ""]) -> TapResult:
        """What was read at query position `i`: residual `[reads, hidden]`, attention `[reads, heads, keys]`."""
        return TapResult(residual=None if self.residual is None else self.residual[:, i],
                         attention=None if self.attention is None else self.attention[:, :, i])


def probabilities(
    q: Float[Array, "q heads head_dim"],
    k: Float[Array, "keys kv_heads head_dim"],
    mask: Bool[Array, "q keys"],
) -> Float[Array, "heads q keys"]:
    """Softmax weights `[heads, query, key]` of post-RoPE queries over post-RoPE keys (GQA groups shared)."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    scores = jnp.einsum("tkgd,skd->kgts", q.reshape(t, kv_heads, heads // kv_heads, d), k)
    softmax_dtype = compute_dtype(q.dtype)
    scores = jnp.where(mask[None, None], scores.astype(softmax_dtype), jnp.finfo(softmax_dtype).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(heads, t, k.shape[0])


def attention_probabilities(
    attention: Attention,
    x: Float[Array, "seq hidden"],
    positions: Int[Array, " seq"],
    mask: Bool[Array, "seq seq"],
) -> Float[Array, "heads seq seq"]:
    """Softmax weights `[heads, query, key]` of one softmax attention layer over its normed input `x`."""
    k, _ = attention.keys_values(x, positions)
    return probabilities(attention.queries(x, positions), k, mask)


def _slot_table(num_layers: int, layers: tuple[int, ...]) -> Int[Array, " layers"]:
    table = np.full((num_layers,), -1, np.int32)
    table[list(layers)] = np.arange(len(layers), dtype=np.int32)
    return jnp.asarray(table)


def _write(buffer: Array, slot: Int[Array, ""], value: Array) -> Array:
    """`buffer[slot] = value` when `slot >= 0`, else unchanged (an in-place update of one row either way)."""
    k = jnp.maximum(slot, 0)
    value = jnp.where(slot >= 0, value.astype(buffer.dtype), buffer[k])
    return jax.lax.dynamic_update_index_in_dim(buffer, value, k, 0)


def layer_indices(stack: DecoderStack) -> tuple[Int[Array, "repeats run"], ...]:
    """Each run's flat layer indices, stacked `[repeats, run_length]` like `stack.runs` (a `per_layer` input of
    `scan_layers`)."""
    tables = [np.zeros((stack.num_repeats, length), np.int32) for _, length in stack.pattern]
    for i in range(stack.num_layers):
        run, repeat, slot = stack.locate(i)
        tables[run][repeat, slot] = i
    return tuple(jnp.asarray(t) for t in tables)


def check(taps: Taps, stack: DecoderStack, seq: int, hidden: int, dtype) -> None:
    """Layer indices in range, attention reads on softmax layers, written values of the right shape and dtype.
    Static: raises before anything runs."""
    n = stack.num_layers
    for name in ("residual", "attention", "patch", "add"):
        bad = [i for i in getattr(taps, name) if not 0 <= i < n]
        if bad:
            raise ValueError(f"taps.{name}: layers {bad} do not exist; the stack has layers 0 .. {n - 1}")
    for i in taps.attention:
        attn = stack.layer(i).self_attn
        if not isinstance(attn, Attention):
            raise ValueError(f"taps.attention: layer {i} is {type(attn).__name__}, which has no softmax "
                             "probabilities to read")
    heads = {stack.layer(i).self_attn.num_heads for i in taps.attention}
    if len(heads) > 1:
        raise ValueError(f"taps.attention: the layers asked have different head counts {sorted(heads)}; read them "
                         "in separate calls")
    if taps.values is not None:
        w = len(taps.written)
        if tuple(taps.values.shape) not in ((w, seq, hidden), (w, hidden)):
            raise ValueError(f"taps.values: expected shape [{w}, {seq}, {hidden}] (writes, seq, hidden) or [{w}, "
                             f"{hidden}] (one vector per written layer), found {_shape(taps.values.shape)}")
        if taps.where is not None and tuple(taps.where.shape) != (w, seq):
            raise ValueError(f"taps.where: expected shape [{w}, {seq}] (writes, seq), found "
                             f"{_shape(taps.where.shape)}")
        if taps.values.dtype != dtype:
            raise ValueError(f"taps.values: expected the activation dtype {jnp.dtype(dtype).name}, found "
                             f"{taps.values.dtype} (cast them yourself)")


def blank(taps: Taps, stack: DecoderStack, seq: int, keys: int, hidden: int, dtype) -> TapResult:
    """Zero read buffers: residual `[reads, seq, hidden]`, attention `[reads, heads, seq, keys]` (None if unasked)."""
    residual = jnp.zeros((len(taps.residual), seq, hidden), dtype) if taps.residual else None
    attention = None
    if taps.attention:
        heads = stack.layer(taps.attention[0]).self_attn.num_heads
        attention = jnp.zeros((len(taps.attention), heads, seq, keys), dtype)
    return TapResult(residual=residual, attention=attention)


# (layer, h, x) -> (h, y): one layer's plain step; (layer, h, x) -> [heads, seq, keys]: its attention probabilities
Forward = Callable[[DecoderLayer, Array, Any], tuple[Array, Any]]
Probabilities = Callable[[DecoderLayer, Array, Any], Array]


def _scan(stack: DecoderStack, h: Array, taps: Taps, keys: int, forward: Forward, probs_of: Probabilities,
          per_layer: tuple | None) -> tuple[Array, tuple, TapResult]:
    """`scan_layers` with `forward` as each layer's step and `taps` applied around it."""
    seq, hidden = h.shape
    n = stack.num_layers
    read_slot, attn_slot, write_slot = (_slot_table(n, layers)
                                        for layers in (taps.residual, taps.attention, taps.written))
    buffers = blank(taps, stack, seq, keys, hidden, h.dtype)
    values, where = taps.values, taps.where

    def write(h, i):
        """Layer `i`'s output replaced (patch) or added to (add) where asked; unchanged at other layers."""
        s = write_slot[i]
        k = jnp.maximum(s, 0)
        sel = s >= 0 if where is None else (s >= 0) & where[k]
        v = values[k]  # [seq, hidden] or [hidden]
        if not taps.add:
            new = v
        elif not taps.patch:
            new = h + v
        else:
            new = jnp.where(k >= len(taps.patch), h + v, v)
        return jnp.where(jnp.reshape(sel, (-1, 1)), new, h)

    def step(layer: DecoderLayer, carry, inputs):
        h, residuals, probs = carry
        i, x = inputs
        if probs is not None and isinstance(layer.self_attn, Attention):
            s = attn_slot[i]
            p = jax.lax.cond(s >= 0, lambda: probs_of(layer, h, x).astype(probs.dtype),
                             lambda: jnp.zeros(probs.shape[1:], probs.dtype))
            probs = _write(probs, s, p)
        h, y = forward(layer, h, x)
        if values is not None:
            h = write(h, i)
        if residuals is not None:
            residuals = _write(residuals, read_slot[i], h)
        return (h, residuals, probs), y

    indices = layer_indices(stack)
    xs = tuple((t, None if per_layer is None else x) for t, x in zip(indices, per_layer or indices))
    (h, residuals, probs), ys = scan_layers(stack, (h, buffers.residual, buffers.attention), step, xs)
    return h, ys, TapResult(residual=residuals, attention=probs)


def run(
    stack: DecoderStack,
    h: Float[Array, "seq hidden"],
    positions: Int[Array, " seq"],
    masks: Mapping[str, Bool[Array, "seq seq"]],
    band: int | None,
    taps: Taps,
) -> tuple[Float[Array, "seq hidden"], TapResult]:
    """`stack(h, positions, masks, band)` with `taps` applied: the final residual and what was read."""
    seq, hidden = h.shape
    check(taps, stack, seq, hidden, h.dtype)

    def forward(layer: DecoderLayer, h, _):
        return layer(h, positions, masks[layer.kind], band if layer.kind == LayerKind.SLIDING else None), None

    def probs_of(layer: DecoderLayer, h, _):
        return attention_probabilities(layer.self_attn, layer.input_layernorm(h), positions, masks[layer.kind])

    h, _, tapped = _scan(stack, h, taps, seq, forward, probs_of, None)
    return h, tapped


def run_with_cache(
    stack: DecoderStack,
    h: Float[Array, "chunk hidden"],
    positions: Int[Array, " chunk"],
    kv_runs: tuple[LayerCache, ...],
    ctx: CacheContext,
    max_len: int,
    taps: Taps,
) -> tuple[Float[Array, "chunk hidden"], tuple[LayerCache, ...], TapResult]:
    """`stack.with_cache(h, positions, kv_runs, ctx)` with `taps` applied: the final residual, the updated cache
    entries and what was read (attention over the cache's `max_len` slots)."""
    seq, hidden = h.shape
    check(taps, stack, seq, hidden, h.dtype)
    if stack.cache_slots is not None and not stack.holds_own_layout(kv_runs):
        raise ValueError("taps: this regrouped stack reads its cache in its own layout when tapped; convert the "
                         "cache once with `cache = eqx.tree_at(lambda c: c.layers, cache, "
                         "model.layers.own_cache_layout(cache.layers))`")
    every_slot = jnp.arange(max_len)

    def forward(layer: DecoderLayer, h, kv):
        return layer.with_cache(h, positions, kv, ctx)

    def probs_of(layer: DecoderLayer, h, kv):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k, _, mask, _, _ = kv.update(attn.finish_kv, *attn.raw_kv(x), positions, ctx)
        p = probabilities(attn.queries(x, positions), k, mask)
        slots = ctx.sliding_slots if layer.kind == LayerKind.SLIDING else every_slot
        if slots is every_slot and k.shape[0] == max_len:
            return p
        # a sliding layer's keys are [its ring entries, the chunk]: put each at its slot (empty entries dropped)
        slots = jnp.where(slots >= 0, slots, max_len)
        return jnp.zeros(p.shape[:2] + (max_len,), p.dtype).at[:, :, slots].set(p, mode="drop")

    h, kv_runs, tapped = _scan(stack, h, taps, max_len, forward, probs_of, kv_runs)
    return h, kv_runs, tapped


def logit_lens(model, residual: Float[InputArray, "*batch hidden"]) -> Float[Array, "*batch vocab"]:
    """The model's final norm `model.norm` and tied soft-capped head `model.logits_from_hidden` applied to
    residuals (e.g. `TapResult.residual`): what each tapped layer would predict if it were the last."""
    hidden = model.config.text.hidden_size
    if np.ndim(residual) < 1 or np.shape(residual)[-1] != hidden:
        raise ValueError(f"logit_lens: residual: expected shape [..., {hidden}] (hidden_size {hidden} last), found "
                         f"{_shape(np.shape(residual))}")
    return model.logits_from_hidden(model.norm(jnp.asarray(residual)))
