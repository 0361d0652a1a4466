"""Taps: read the residual stream and attention probabilities out of the scanned decoder stack, and patch it.

    taps = g4.Taps(residual=(0, 3, 5), attention=(5,))
    logits, tapped = model(input_ids, taps=taps)
    tapped.residual      # [3, seq, hidden]: the residual stream after layers 0, 3 and 5 (in the order asked)
    tapped.attention     # [1, heads, seq, seq]: layer 5's attention probabilities (query, key)

    patch = g4.Taps(patch=(3,), values=tapped.residual[1:2], where=image_slots[None])
    logits, _ = model(corrupted_ids, taps=patch)  # layer 3's output replaced at `where`, the rest recomputed

Semantics. Layer `i`'s *residual* is its output, the stream layer `i + 1` reads (the last layer's is the input of
the final norm; `g4.taps.logit_lens` turns residuals into logits). A patch at layer `i` replaces that output at the
positions `where` marks (all positions when `where` is None) before anything downstream sees it, and a residual
read at a patched layer returns the patched value. Attention probabilities are the layer's softmax weights per
query head, computed as `layers.kernels.dot_product_attention` computes them (scores in the activation dtype,
softmax in fp32, cast back): exactly what the default kernel multiplies the values with; under another kernel or
`numerics="invariant"` the same function with that kernel's rounding left out.

The layers stay a `lax.scan` (one body per layer kind): each layer step gets its flat index and looks up, in
small constant tables, whether to read or patch, writing into `[n, ...]` buffers carried through the scan, so
only the asked-for layers are stored. Works under `jax.jit`, `jax.vmap` (vmap the model call; `values` and
`where` may carry the batch axis) and `jax.grad` (gradients flow into `values` and through the residuals).
Attention reads compute the probabilities only at the layers asked for (a `lax.cond`), except under `vmap`,
where the cond becomes a select and every softmax layer computes them. With no taps the model runs exactly the
program it runs without this module (`tests/test_taps.py` compares the
jaxprs and lowered programs). Taps act on the whole-sequence forward (`model(...)`, `hidden_states`,
`decode_hidden`), not on cached decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..layers.attention import Attention
from ..layers.decoder import DecoderLayer, DecoderStack, scan_layers
from ..layers.kinds import LayerKind
from ..layers.numerics import compute_dtype


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


class Taps(eqx.Module):
    """Which layers to read and patch (static layer indices) and the patch values (arrays).

    - `residual`: layers whose output (the residual stream after the layer) is read, in this order.
    - `attention`: layers whose attention probabilities are read, in this order.
    - `patch`: layers whose output is replaced; `values` `[len(patch), seq, hidden]` in the model's activation
      dtype, row k for layer `patch[k]`; `where` `[len(patch), seq]` bool says at which positions (None: all).
    Layer indices are flat (0 .. num_layers - 1), as in the checkpoint's names.
    """

    residual: tuple[int, ...] = eqx.field(static=True)
    attention: tuple[int, ...] = eqx.field(static=True)
    patch: tuple[int, ...] = eqx.field(static=True)
    values: Float[Array, "*batch patches seq hidden"] | None
    where: Bool[Array, "*batch patches seq"] | None

    def __init__(self, residual: Sequence[int] | int = (), attention: Sequence[int] | int = (),
                 patch: Sequence[int] | int = (), values: Float[Array, "*batch patches seq hidden"] | None = None,
                 where: Bool[Array, "*batch patches seq"] | None = None):
        self.residual = _layer_tuple("residual", residual)
        self.attention = _layer_tuple("attention", attention)
        self.patch = _layer_tuple("patch", patch)
        if self.patch and values is None:
            raise ValueError(f"values: patching layers {self.patch} needs values [{len(self.patch)}, seq, hidden]")
        if not self.patch and (values is not None or where is not None):
            raise ValueError("values, where: given without `patch` (the layers they replace)")
        if values is not None and (values.ndim < 3 or values.shape[-3] != len(self.patch)):
            raise ValueError(f"values: expected shape [{len(self.patch)}, seq, hidden] (one row per patched layer; "
                             f"a leading batch axis for vmap allowed), found {list(values.shape)}")
        if where is not None:
            if where.dtype != jnp.bool_:
                raise ValueError(f"where: expected a bool mask [patches, seq], found dtype {where.dtype}")
            if tuple(where.shape) != tuple(values.shape[:-1]):
                raise ValueError(f"where: expected shape {list(values.shape[:-1])} (patches, seq), found "
                                 f"{list(where.shape)}")
        self.values, self.where = values, where

    @property
    def empty(self) -> bool:
        """Nothing to read or patch: the model then runs its untapped program."""
        return not (self.residual or self.attention or self.patch)


class TapResult(eqx.Module):
    """What `Taps` read: `residual` `[len(taps.residual), seq, hidden]` and `attention`
    `[len(taps.attention), heads, seq, seq]` (query, key) in the order asked; None where nothing was asked."""

    residual: Float[Array, "residual_reads seq hidden"] | None
    attention: Float[Array, "attention_reads heads q k"] | None


def attention_probabilities(
    attention: Attention,
    x: Float[Array, "seq hidden"],
    positions: Int[Array, " seq"],
    mask: Bool[Array, "seq seq"],
) -> Float[Array, "heads seq seq"]:
    """Softmax weights `[heads, query, key]` of one softmax attention layer over its normed input `x`."""
    q = attention.queries(x, positions)
    k, _ = attention.keys_values(x, positions)
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    scores = jnp.einsum("tkgd,skd->kgts", q.reshape(t, kv_heads, heads // kv_heads, d), k)
    softmax_dtype = compute_dtype(q.dtype)
    scores = jnp.where(mask[None, None], scores.astype(softmax_dtype), jnp.finfo(softmax_dtype).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(heads, t, k.shape[0])


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
    """Layer indices in range, attention reads on softmax layers, patch values of the right shape and dtype."""
    n = stack.num_layers
    for name in ("residual", "attention", "patch"):
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
        if tuple(taps.values.shape) != (len(taps.patch), seq, hidden):
            raise ValueError(f"taps.values: expected shape [{len(taps.patch)}, {seq}, {hidden}] (patches, seq, "
                             f"hidden), found {list(taps.values.shape)}")
        if taps.where is not None and tuple(taps.where.shape) != (len(taps.patch), seq):
            raise ValueError(f"taps.where: expected shape [{len(taps.patch)}, {seq}] (patches, seq), found "
                             f"{list(taps.where.shape)}")
        if taps.values.dtype != dtype:
            raise ValueError(f"taps.values: expected the activation dtype {jnp.dtype(dtype).name}, found "
                             f"{taps.values.dtype} (cast them yourself)")


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
    n = stack.num_layers
    read_slot, attn_slot, patch_slot = (_slot_table(n, getattr(taps, f))
                                        for f in ("residual", "attention", "patch"))
    residuals = jnp.zeros((len(taps.residual), seq, hidden), h.dtype) if taps.residual else None
    probs = None
    if taps.attention:
        heads = stack.layer(taps.attention[0]).self_attn.num_heads
        probs = jnp.zeros((len(taps.attention), heads, seq, seq), h.dtype)
    where = None
    if taps.patch:
        where = jnp.ones((len(taps.patch), seq), bool) if taps.where is None else taps.where

    def step(layer: DecoderLayer, carry, i):
        h, residuals, probs = carry
        mask = masks[layer.kind]
        if probs is not None and isinstance(layer.self_attn, Attention):
            s = attn_slot[i]
            x = layer.input_layernorm(h)
            p = jax.lax.cond(s >= 0, lambda: attention_probabilities(layer.self_attn, x, positions, mask),
                             lambda: jnp.zeros(probs.shape[1:], probs.dtype))
            probs = _write(probs, s, p)
        h = layer(h, positions, mask, band if layer.kind == LayerKind.SLIDING else None)
        if where is not None:
            s = patch_slot[i]
            k = jnp.maximum(s, 0)
            h = jnp.where(((s >= 0) & where[k])[:, None], taps.values[k], h)
        if residuals is not None:
            residuals = _write(residuals, read_slot[i], h)
        return (h, residuals, probs), None

    (h, residuals, probs), _ = scan_layers(stack, (h, residuals, probs), step, layer_indices(stack))
    return h, TapResult(residual=residuals, attention=probs)


def logit_lens(model, residual: Float[Array, "*batch hidden"]) -> Float[Array, "*batch vocab"]:
    """The model's final norm and tied soft-capped head applied to residuals (e.g. `TapResult.residual`): what
    each tapped layer would predict if it were the last."""
    return model.logits_from_hidden(model.norm(residual))
