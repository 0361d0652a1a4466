"""Model surgery on `Gemma4`: swap attention modules, freeze, add low-rank adapters (saving the result: `io.surgery`).

Everything is built on `eqx.tree_at`; every result is an ordinary `Gemma4` pytree that jits, vmaps and grads.

Where things live. The decoder keeps its layers *stacked* per run of the repeating pattern
(`model.layers.runs[j]`, every array with leading axes `[repeats, run_length]`; `model.layers.locate(i)` maps a
flat layer index to `(run, repeat, slot)`). For the 12B the runs are `(5 sliding, 1 full) x 8`, so
`model.layers.runs[1].self_attn` *is* the attention of the 8 global layers, stacked `[8, 1, ...]`.

How an edit is applied (`map_layers`, which `replace_attention` and `add_lora` use):
- the chosen layers cover whole runs (e.g. `layers="full"`): the new per-layer modules are stacked into that run
  in place; nothing else moves and the KV-cache layout is unchanged;
- they cover part of a run (e.g. `layers=[5]` of the 12B, or `[2]`): the decoder is *regrouped*: layers are
  gathered, and stacked again into the shortest repeating pattern of layer kinds (a kind = a pytree structure
  plus shapes). `[2, 8, 14, ...]` (the same slot in every period) keeps 8 repeats with a run split in three;
  an irregular set unrolls the repeats (one period of 48 layers: more scan bodies, a longer compile). The
  weights are copied once.
Either way the result is an ordinary `DecoderStack`; a regrouped one carries `cache_slots`, where each of its
layers sits in the stock KV-cache layout, so `g4.generate` keeps working. Replacement attentions implement
`g4.layers.attention.AbstractAttention` (`__call__` and `with_cache`).

Saving. `g4.save` writes transformers' names, and only the stock modules have them: for a model holding a
replacement attention or `LoRALinear` it raises instead of writing a checkpoint that silently lacks the new
parameters. Use `merge_lora` first (the result is stock again), or `g4.surgery.save` / `g4.surgery.load` (Equinox's
`tree_serialise_leaves` plus config.json, written atomically like `g4.save`; `io.surgery`; loading re-runs your
surgery on an abstract model to get the skeleton).
Adapters alone: `g4.save_adapters` / `g4.load_adapters` (PEFT's format, a few MB; `attach_lora` / `lora_weights`
below put them on and read them out).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ..config import FULL, SLIDING
from ..layers.attention import AbstractAttention, Attention
from ..layers.decoder import DecoderStack, kind_ids, slice_layer, stack_modules
from ..layers.linear import Linear

# The example replacement lives with the other layers; re-exported so `g4.surgery.LinearAttention` keeps working.
from ..layers.linear_attention import LinearAttention, linear_attention  # noqa: F401  (g4.surgery.LinearAttention)
from ..layers.lora import LoRALinear
from ..layers.mlp import MLP
from .gemma4 import Gemma4

Layers = str | int | Sequence[int]


# ---- which layers --------------------------------------------------------------------------------
def layer_indices(model: Gemma4, layers: Layers = "full") -> tuple[int, ...]:
    """`"all"`, `"full"` (global layers), `"sliding"`, one index or a sequence of flat HF layer indices."""
    types = model.config.text.layer_types
    if isinstance(layers, str):
        if layers == "all":
            return tuple(range(len(types)))
        if layers in ("full", "sliding"):
            want = FULL if layers == "full" else SLIDING
            return tuple(i for i, t in enumerate(types) if t == want)
        raise ValueError(f"layers: expected 'all', 'full', 'sliding' or layer indices, found {layers!r}")
    picked = (layers,) if isinstance(layers, int) else tuple(layers)
    for i in picked:
        if not isinstance(i, int) or not 0 <= i < len(types):
            raise ValueError(f"layers: {i!r} is not a layer index in [0, {len(types)})")
    if not picked:
        raise ValueError("layers: no layer selected")
    return tuple(sorted(set(picked)))


# ---- stacking ------------------------------------------------------------------------------------
def _stock_slots(stack: DecoderStack) -> tuple[tuple[int, int, int], ...]:
    if stack.cache_slots is not None:
        return stack.cache_slots
    return tuple(stack.locate(i) for i in range(stack.num_layers))


def _restacked(stack: DecoderStack, runs, pattern, repeats: int, slots) -> DecoderStack:
    """A stack of `runs`; `cache_slots` only where the layout differs from the stock one."""
    new = DecoderStack(runs=tuple(runs), remat=stack.remat, pattern=tuple(pattern), num_repeats=repeats,
                       unroll=stack.unroll, cache_slots=None)
    if slots is not None and tuple(new.locate(i) for i in range(new.num_layers)) != tuple(slots):
        new = DecoderStack(runs=tuple(runs), remat=stack.remat, pattern=tuple(pattern), num_repeats=repeats,
                           unroll=stack.unroll, cache_slots=tuple(slots))
    return new


def _regroup(stack: DecoderStack, layers: list) -> DecoderStack:
    """Stack per-layer modules into the shortest repeating pattern of layer kinds."""
    n = len(layers)
    kinds = kind_ids(layers)
    period = next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))
    runs_at: list[list[int]] = []  # [start, length] within the period
    for off in range(period):
        if runs_at and kinds[off] == kinds[runs_at[-1][0]]:
            runs_at[-1][1] += 1
        else:
            runs_at.append([off, 1])
    repeats = n // period
    runs = [stack_modules([layers[r * period + start + s] for r in range(repeats) for s in range(length)],
                          (repeats, length), f"layers of run {start}..{start + length - 1}")
            for start, length in runs_at]
    pattern = tuple((layers[start].kind, length) for start, length in runs_at)
    return _restacked(stack, runs, pattern, repeats, _stock_slots(stack))


def map_layers(model: Gemma4, fn: Callable[[Any, int], Any], layers: Layers = "all",
               where: Callable[[Any], Any] = lambda layer: layer) -> Gemma4:
    """Replace `where(layer)` by `fn(where(layer), i)` in every chosen layer `i` (one unstacked layer at a time).

    `fn` sees one layer's subtree (e.g. its `self_attn`) and its flat index, and returns the new subtree; the
    results are stacked back (see the module docstring for whole vs partial runs).
    """
    idx = layer_indices(model, layers)
    stack = model.layers
    by_run: dict[int, list[int]] = {}
    for i in idx:
        by_run.setdefault(stack.locate(i)[0], []).append(i)
    whole = all(len(members) == stack.num_repeats * stack.pattern[j][1] for j, members in by_run.items())
    if whole:
        runs = list(stack.runs)
        for j, members in by_run.items():
            new = [fn(slice_layer(where(runs[j]), *stack.locate(i)[1:]), i) for i in members]  # in (r, s) order
            lead = (stack.num_repeats, stack.pattern[j][1])
            runs[j] = eqx.tree_at(where, runs[j], stack_modules(new, lead, f"replacements of layers {members}"))
        new_stack = _restacked(stack, runs, stack.pattern, stack.num_repeats, stack.cache_slots)
    else:
        views = [stack.layer(i) for i in range(stack.num_layers)]
        for i in idx:
            views[i] = eqx.tree_at(where, views[i], fn(where(views[i]), i))
        new_stack = _regroup(stack, views)
    return eqx.tree_at(lambda m: m.layers, model, new_stack)


def replace_attention(model: Gemma4, replacement: Callable[[Attention, int], eqx.Module] | eqx.Module,
                      layers: Layers = "full") -> Gemma4:
    """Swap the attention of the chosen layers (default: the global ones) for a module of the same interface.

    `replacement(old_attention, layer_index) -> module` (or `replacement(old_attention)`, e.g. a class such as
    `LinearAttention`) is called once per layer with that layer's current attention (unstacked, so it can reuse
    the pretrained projections); a ready module is copied to every layer.
    The module must implement `g4.layers.attention.AbstractAttention`: `__call__(x [seq, hidden], positions [seq],
    mask [seq, seq], band=None) -> [seq, hidden]` and `with_cache(x, positions, kv, ctx) -> (out, kv)` (see
    `Attention.with_cache` and `LinearAttention.with_cache`: `kv.update(...)` reads and writes the layer's cache).
    """
    if isinstance(replacement, eqx.Module) or not callable(replacement):
        make = lambda old, i: replacement
    else:
        try:
            inspect.signature(replacement).bind(None, 0)
            make = replacement
        except TypeError:  # a one-argument factory, e.g. the class LinearAttention
            make = lambda old, i: replacement(old)

    def checked(old, i):
        new = make(old, i)
        if not isinstance(new, AbstractAttention):
            raise TypeError(f"replacement for layer {i}: {type(new).__name__} is not a "
                            "g4.layers.attention.AbstractAttention; subclass it and implement __call__(x, positions, "
                            "mask, band=None) and with_cache(x, positions, kv, ctx) (the cached path of "
                            "g4.generate / prefill / decode_step)")
        return new

    return map_layers(model, checked, layers, where=lambda layer: layer.self_attn)


# ---- low-rank adapters -----------------------------------------------------------------------------
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def add_lora(model: Gemma4, *, key: PRNGKeyArray, rank: int = 8, alpha: float | None = None,
             targets: Sequence[str] = ("q_proj", "v_proj"), layers: Layers = "all") -> Gemma4:
    """Wrap the named projections (`q_proj` ... `o_proj`, `gate_proj` ... `down_proj`) of the chosen layers in
    `LoRALinear`. Projections a layer lacks (the global layers' `v_proj` when keys are values) are skipped."""
    unknown = set(targets) - set(ATTENTION_PROJECTIONS + MLP_PROJECTIONS)
    if unknown:
        raise ValueError(f"targets: unknown projection(s) {sorted(unknown)}; expected names from "
                         f"{ATTENTION_PROJECTIONS + MLP_PROJECTIONS}")

    def wrap(layer, i):
        for k, name in enumerate(targets):
            owner = (lambda l: l.self_attn) if name in ATTENTION_PROJECTIONS else (lambda l: l.mlp)
            base = getattr(owner(layer), name, None)
            if isinstance(base, Linear):
                lora = LoRALinear(base, rank, key=jax.random.fold_in(key, i * 16 + k), alpha=alpha)
                layer = eqx.tree_at(lambda l: getattr(owner(l), name), layer, lora)
        return layer

    return map_layers(model, wrap, layers)


# ---- given adapters: onto a model and back out (the file format is `g4.io.adapters`') --------------------
@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One layer's adapter of one projection: `y = W x + scale * (x @ a) @ b`, `a [in, rank]`, `b [rank, out]`
    (this package's `[in, out]` orientation; PEFT stores `lora_A = a.T`, `lora_B = b.T`)."""

    a: Any
    b: Any
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])


def _owner(layer: Any, name: str) -> Any:
    return layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp


def attach_lora(model: Gemma4, weights: Mapping[tuple[int, str], LoRAWeights]) -> Gemma4:
    """Wrap the projections named by `weights` (`(flat layer index, "q_proj" ... "down_proj") -> LoRAWeights`) in
    `LoRALinear` holding exactly those adapters (cast to each projection's dtype).

    Every stacked run that holds an adapted layer is edited as a whole, so the decoder is never regrouped and the
    KV-cache layout stays. Per run and projection: when every layer of the run has an adapter of the same rank and
    scaling the result is `add_lora`'s uniform form (static `scale`); otherwise the per-layer form (ranks zero-padded
    to the run's largest, `lora_scale` / `lora_rank` leaves; layers without an adapter add exact zeros): see
    `gemma4_eqx.layers.lora`. The projections must be plain `Linear`s (not already adapted, not quantized).
    """
    stack = model.layers
    plan: dict[tuple[int, str], dict[int, LoRAWeights]] = {}
    for (i, name), w in sorted(weights.items()):
        if name not in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            raise ValueError(f"layer {i}: unknown projection {name!r}; expected one of "
                             f"{ATTENTION_PROJECTIONS + MLP_PROJECTIONS}")
        if not isinstance(i, int) or not 0 <= i < stack.num_layers:
            raise ValueError(f"{name}: {i!r} is not a layer index in [0, {stack.num_layers})")
        run = stack.locate(i)[0]
        base = getattr(_owner(stack.runs[run], name), name, None)
        where = f"layer {i} {name} (model.layers.runs[{run}])"
        if base is None:
            raise ValueError(f"{where}: the layer has no such projection (a full layer whose keys are its values has "
                             "no v_proj: an adapter on its k_proj adapts the values too)")
        if not isinstance(base, Linear):
            hint = ("it already holds adapters (fold them in with merge_lora first)" if isinstance(base, LoRALinear)
                    else "adapters go onto a float model's plain Linear projections")
            raise ValueError(f"{where}: expected a plain Linear, found {type(base).__name__}; {hint}")
        a, b = w.a, w.b
        if a.ndim != 2 or b.ndim != 2 or a.shape != (base.in_features, b.shape[0]) or b.shape[1] != base.out_features:
            raise ValueError(f"{where}: adapter a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the projection; "
                             f"expected a [{base.in_features}, r] and b [r, {base.out_features}]")
        plan.setdefault((run, name), {})[i] = w
    if not plan:
        return model

    forms: dict[tuple[int, str], tuple[bool, int]] = {}  # (run, name) -> (uniform, padded rank)
    for (run, name), members in plan.items():
        ws = list(members.values())
        uniform = (len(ws) == len(stack.members(run)) and len({w.rank for w in ws}) == 1
                   and len({float(w.scale) for w in ws}) == 1)
        forms[run, name] = (uniform, max(w.rank for w in ws))

    def wrap(layer, i):
        run = stack.locate(i)[0]
        for (j, name), members in plan.items():
            if j != run:
                continue
            uniform, rank = forms[j, name]
            base = getattr(_owner(layer, name), name)
            w = members.get(i)
            if uniform:
                lora = LoRALinear(base, lora_a=jnp.asarray(w.a), lora_b=jnp.asarray(w.b), scale=float(w.scale))
            else:
                a = np.zeros((base.in_features, rank), np.dtype(base.weight.dtype))
                b = np.zeros((rank, base.out_features), np.dtype(base.weight.dtype))
                if w is not None:
                    a[:, :w.rank] = np.asarray(w.a, a.dtype)
                    b[:w.rank] = np.asarray(w.b, b.dtype)
                lora = LoRALinear(base, lora_a=jnp.asarray(a), lora_b=jnp.asarray(b),
                                  scale=jnp.asarray(0.0 if w is None else float(w.scale), jnp.float32),
                                  used_rank=0 if w is None else w.rank)
            layer = eqx.tree_at(lambda l, name=name: getattr(_owner(l, name), name), layer, lora)
        return layer

    runs = sorted({run for run, _ in plan})
    return map_layers(model, wrap, [i for run in runs for i in stack.members(run)])


def lora_weights(model: Gemma4) -> dict[tuple[int, str], LoRAWeights]:
    """Every decoder adapter of `model` as `(flat layer index, projection) -> LoRAWeights` (host numpy arrays, the
    padding of the per-layer form cut off, layers without an adapter left out): the inverse of `attach_lora`.

    Raises when a `LoRALinear` sits where no decoder projection name reaches it (e.g. in a replaced attention or an
    embedder), or when the zero padding of a per-layer adapter is not zero any more.
    """
    stack = model.layers
    found: dict[tuple[int, str], LoRAWeights] = {}
    seen: set[int] = set()
    for run, layer in enumerate(stack.runs):
        for name in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            owner = _owner(layer, name)
            lora = getattr(owner, name, None)
            if not isinstance(lora, LoRALinear):
                continue
            if not isinstance(owner, (Attention, MLP)):
                raise ValueError(f"model.layers.runs[{run}].{'self_attn' if name in ATTENTION_PROJECTIONS else 'mlp'}"
                                 f".{name}: a LoRALinear inside a {type(owner).__name__}, which has no transformers "
                                 "name; only the stock attention and MLP projections are named")
            seen.add(id(lora))
            a_all, b_all = np.asarray(jax.device_get(lora.lora_a)), np.asarray(jax.device_get(lora.lora_b))
            scales = None if lora.lora_scale is None else np.asarray(jax.device_get(lora.lora_scale))
            ranks = None if lora.lora_rank is None else np.asarray(jax.device_get(lora.lora_rank))
            for i in stack.members(run):
                _, r, s = stack.locate(i)
                a, b = a_all[r, s], b_all[r, s]
                k = a.shape[-1] if ranks is None else int(ranks[r, s])
                if k == 0:
                    continue
                if np.any(a[:, k:]) or np.any(b[k:]):
                    raise ValueError(f"layer {i} {name}: the adapter's rank is {k} but its zero padding (columns "
                                     f"{k}.. of lora_a, rows {k}.. of lora_b) holds non-zero values")
                scale = lora.scale if scales is None else float(scales[r, s])
                found[i, name] = LoRAWeights(a[:, :k], b[:k], scale)
    is_lora = lambda x: isinstance(x, LoRALinear)
    stray = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(model, is_leaf=is_lora)
             if is_lora(x) and id(x) not in seen]
    if stray:
        raise ValueError(f"model{stray[0]}: a LoRALinear outside the decoder's attention and MLP projections; "
                         "only those have transformers (and PEFT) names")
    return found


def merge_lora(model: PyTree) -> PyTree:
    """Fold every `LoRALinear` into a plain `Linear` (`W + scale * A @ B`, in fp32 then cast back)."""
    is_lora = lambda x: isinstance(x, LoRALinear)
    return jax.tree.map(lambda x: x.merged() if is_lora(x) else x, model, is_leaf=is_lora)


# ---- freezing: filter specs for eqx.partition ------------------------------------------------------
def trainable(model: PyTree, *wheres: Callable[[Any], Any]) -> PyTree[bool]:
    """A filter spec: True on the floating arrays under any `where(model)` (a node or a tuple/list of nodes)."""
    spec = jax.tree.map(lambda _: False, model)
    for where in wheres:
        nodes = lambda s: tuple(n for n in _as_tuple(where(s)) if n is not None)
        spec = eqx.tree_at(nodes, spec, replace_fn=lambda sub: jax.tree.map(lambda _: True, sub))
    return jax.tree.map(lambda keep, x: bool(keep) and eqx.is_inexact_array(x), spec, model)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _whole_runs(model: Gemma4, layers: Layers) -> tuple[int, ...]:
    stack = model.layers
    idx = set(layer_indices(model, layers))
    runs = sorted({stack.locate(i)[0] for i in idx})
    for j in runs:
        members = {i for i in range(stack.num_layers) if stack.locate(i)[0] == j}
        if not members <= idx:
            raise ValueError(f"layers: {sorted(idx & members)} share stacked arrays with layers {sorted(members - idx)}"
                             f" (run {j}); a filter spec selects whole arrays. Select the whole run, or regroup first "
                             "(e.g. replace those layers' attention with g4.surgery.replace_attention)")
    return tuple(runs)


def only_layers(model: Gemma4, layers: Layers = "full",
                where: Callable[[Any], Any] = lambda layer: layer) -> PyTree[bool]:
    """Train `where(layer)` of the chosen layers only (whole stacked runs)."""
    runs = _whole_runs(model, layers)
    return trainable(model, lambda m: tuple(where(m.layers.runs[j]) for j in runs))


def only_attention(model: Gemma4, layers: Layers = "full") -> PyTree[bool]:
    """Train only the attention modules (stock or replaced) of the chosen layers."""
    return only_layers(model, layers, lambda layer: layer.self_attn)


def only_full_attention(model: Gemma4) -> PyTree[bool]:
    """Train only the attention of the global (full) layers: the swap point of linear-attention surgery."""
    return only_attention(model, "full")


def only_embedders(model: Gemma4, *, tokens: bool = False) -> PyTree[bool]:
    """Train only the vision and audio embedders (and the tied token embedding with `tokens=True`)."""
    return trainable(model, lambda m: (m.embed_vision, m.embed_audio) + ((m.embed_tokens,) if tokens else ()))


def only_lora(model: PyTree) -> PyTree[bool]:
    """Train only the adapters (`lora_a`, `lora_b`) of every `LoRALinear`."""
    is_lora = lambda x: isinstance(x, LoRALinear)
    loras = lambda m: [x for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x)]
    return trainable(model, lambda m: tuple(a for x in loras(m) for a in (x.lora_a, x.lora_b)))


def union(*specs: PyTree[bool]) -> PyTree[bool]:
    return jax.tree.map(lambda *xs: any(xs), *specs)


__all__ = ["ATTENTION_PROJECTIONS", "MLP_PROJECTIONS", "Layers", "LinearAttention", "LoRALinear", "LoRAWeights",
           "add_lora", "attach_lora", "layer_indices", "linear_attention", "lora_weights", "map_layers", "merge_lora",
           "only_attention", "only_embedders", "only_full_attention", "only_layers", "only_lora", "replace_attention",
           "trainable", "union"]
