"""Serving layouts: an explicit transform that lays a model's weights out for fast decoding, never saved.

The stored model keeps the checkpoint's shapes: one array per HF tensor, the decoder layers stacked per run
(`[repeats, run_length, ...]`), which names, sharding rules, LoRA and the bridge rely on. Decoding one token at a
time from that layout makes XLA:CPU slice every layer's weights out of the stacked arrays on every step (the
scan's `dynamic-slice` becomes a copy of each weight: on the 65 M-parameter benchmark model that alone was most of
a decode step; `benchmarks/RESULTS.md`). `serving_layout(model)` returns the same model with every layer in its
own arrays (a regrouped `DecoderStack`, one run per layer, unrolled), so each product reads its weight where it
lies, and (unless `fuse_mlp=False`) each MLP's gate and up projections side by side in one weight
(`layers.mlp.FusedMLP`: one product instead of two; its `gate_proj` / `up_proj` are views of the halves, so saving
still writes transformers' tensors). The numbers are the same function (same operations on the same weights; XLA
may fuse the unrolled program differently, within the default numerics' rounding).

It costs one copy of the decoder weights when it is made (drop the original to get the memory back; or
`consume=True`, which frees each stacked array as it is cut up) and a longer compile (one layer body per layer
instead of one per run). Keep it for serving: `g4.save` writes stock layouts. `g4.load(..., layout="serving")` loads
straight into it (the CLI, the chat command and the server do).
"""

from __future__ import annotations

import equinox as eqx
import jax

from ..layers.decoder import DecoderLayer, DecoderStack
from ..layers.linear import Linear
from ..layers.mlp import MLP, FusedMLP


def _fused(layer: DecoderLayer) -> DecoderLayer:
    """The layer with its MLP's gate and up projections fused, when they are plain `Linear`s (a quantized or
    LoRA-wrapped MLP stays as it is)."""
    mlp = layer.mlp
    if type(mlp) is MLP and type(mlp.gate_proj) is Linear and type(mlp.up_proj) is Linear:
        return eqx.tree_at(lambda l: l.mlp, layer, FusedMLP.of(mlp))
    return layer


def serving_layout(model: eqx.Module, *, fuse_mlp: bool = True, consume: bool = False) -> eqx.Module:
    """`model` (a `g4.Gemma4`) with every decoder layer in its own arrays and the layer loop unrolled; with
    `fuse_mlp`, each MLP's gate and up projections in one weight.

    Caches made by `KVCache.init` keep working (the stack carries `cache_slots`); `g4.generate` gathers its cache
    into the stack's own layout once per call so that decode steps update it in place.

    The layers are cut out of the stacked arrays one stacked array at a time. `consume=True` frees each stacked
    array as soon as its layers are cut out (`g4.load(..., layout="serving")` does this with the model it just
    loaded), so the conversion needs the model's bytes plus one stacked array rather than twice the decoder; the
    `model` passed in is unusable afterwards.
    """
    stack: DecoderStack = model.layers
    n = stack.num_layers
    where = [stack.locate(i) for i in range(n)]
    layers: list = [None] * n
    for r, run in enumerate(stack.runs):
        arrays, static = eqx.partition(run, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        mine = [i for i in range(n) if where[i][0] == r]
        pieces: dict[int, list] = {i: [] for i in mine}
        for leaf in leaves:
            if leaf.shape[:2] == (1, 1):  # a run of one layer already: kept as it is
                pieces[mine[0]].append(leaf)
                continue
            for i in mine:
                _, repeat, slot = where[i]
                pieces[i].append(leaf[repeat:repeat + 1, slot:slot + 1])  # [1, 1, ...]: a run of one layer
            if consume:
                jax.block_until_ready([pieces[i][-1] for i in mine])
                leaf.delete()
        for i in mine:
            layers[i] = eqx.combine(jax.tree.unflatten(treedef, pieces[i]), static)
    if fuse_mlp:
        layers = [_fused(layer) for layer in layers]
    slots = stack.cache_slots or tuple(where)
    pattern = tuple((stack.pattern[where[i][0]][0], 1) for i in range(n))
    new = DecoderStack(runs=tuple(layers), remat=stack.remat, pattern=pattern, num_repeats=1, unroll=True,
                       cache_slots=None)
    if tuple(new.locate(i) for i in range(new.num_layers)) != tuple(slots):  # else the stock layout already
        new = DecoderStack(runs=tuple(layers), remat=stack.remat, pattern=pattern, num_repeats=1, unroll=True,
                           cache_slots=tuple(slots))
    return eqx.tree_at(lambda m: m.layers, model, new)
