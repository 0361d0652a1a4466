"""One decoder layer and the scanned stack of layers.

Gemma 4's 48 layers are 8 repeats of one period (5 sliding + 1 full). Layers of the two kinds have different
shapes, so the stack keeps one stacked module per *run* of equal layers inside the period, with leading axes
`[repeats, run_length]`, and runs `lax.scan` over the repeats (and an inner scan over each run). The compiled
program therefore holds one sliding and one full layer body, whatever the depth.

`scan_layers` is the one place that scans: the forward and the cached path both call it with a per-layer step,
and whatever a step returns besides the residual stream comes out stacked like the runs (the cache entries
today; a layer's activations for taps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import TextConfig
from .attention import AbstractAttention, Attention
from .cache import CacheContext, LayerCache
from .kinds import LayerKind, layer_pattern, layer_repeats
from .mlp import MLP, FusedMLP
from .norm import RMSNorm
from .policy import XLA, AttentionKernel, Numerics, Remat, XLAKernel, as_remat  # noqa: F401

# (run, repeat, slot within the run) of a flat layer index
Location = tuple[int, int, int]


class DecoderLayer(eqx.Module):
    self_attn: AbstractAttention
    mlp: MLP | FusedMLP  # FusedMLP only in a serving layout (g4.serving_layout)
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    pre_feedforward_layernorm: RMSNorm
    post_feedforward_layernorm: RMSNorm
    layer_scalar: Float[Array, "1"]
    kind: LayerKind = eqx.field(static=True)

    def __init__(self, cfg: TextConfig, kind: LayerKind | str, *, key: PRNGKeyArray, dtype=jnp.float32,
                 numerics: Numerics = XLA(), kernel: AttentionKernel = XLAKernel()):
        ka, km = jax.random.split(key)
        kind = LayerKind(kind)
        geometry = cfg.layer_geometry_for_type(kind)
        d, eps, std = cfg.hidden_size, cfg.rms_norm_eps, cfg.initializer_range
        self.self_attn = Attention(d, cfg.num_attention_heads, geometry, eps=eps, key=ka, std=std, dtype=dtype,
                                   numerics=numerics, kernel=kernel)
        self.mlp = MLP(d, cfg.intermediate_size, key=km, std=std, dtype=dtype, numerics=numerics)
        norm = lambda: RMSNorm(d, eps=eps, dtype=dtype, numerics=numerics)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.layer_scalar = jnp.ones((1,), dtype)
        self.kind = kind

    @property
    def layer_type(self) -> str:
        """transformers' name of the layer kind (`"sliding_attention"` / `"full_attention"`)."""
        return self.kind.value

    def __call__(
        self,
        h: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """`band`: `mask` is a pure sliding window of that size (text-only sliding layers)."""
        return self.feed_forward(h, self.self_attn(self.input_layernorm(h), positions, mask, band))

    def with_cache(
        self, h: Float[Array, "chunk hidden"], positions: Int[Array, " chunk"], kv: LayerCache, ctx: CacheContext
    ) -> tuple[Float[Array, "chunk hidden"], LayerCache]:
        """The same layer over a chunk of new tokens, reading and updating its KV cache entry."""
        a, kv = self.self_attn.with_cache(self.input_layernorm(h), positions, kv, ctx)
        return self.feed_forward(h, a), kv

    def feed_forward(
        self, h: Float[Array, "seq hidden"], a: Float[Array, "seq hidden"]
    ) -> Float[Array, "seq hidden"]:
        """The rest of the layer once the attention output `a` is known: residuals, MLP, layer scalar."""
        h = h + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(h))
        h = h + self.post_feedforward_layernorm(m)
        # Once per layer, after the MLP residual; the attention half is not scaled on its own.
        return h * self.layer_scalar.astype(h.dtype)


# ---- stacking ---------------------------------------------------------------------------------------------------
def slice_layer(tree: Any, repeat: int, slot: int) -> Any:
    """One layer's view of a `[repeats, run_length, ...]`-stacked pytree."""
    return jax.tree.map(lambda a: a[repeat, slot] if eqx.is_array(a) else a, tree)


def _difference(a: Any, b: Any) -> str | None:
    """Why two modules cannot be stacked together (None when they can)."""
    (arrays_a, static_a), (arrays_b, static_b) = eqx.partition(a, eqx.is_array), eqx.partition(b, eqx.is_array)
    if jax.tree.structure(arrays_a) != jax.tree.structure(arrays_b) or eqx.tree_equal(static_a, static_b) is not True:
        return "structure or static fields"
    for x, y in zip(jax.tree.leaves(arrays_a), jax.tree.leaves(arrays_b)):
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            return f"an array {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
    return None


def stack_modules(modules: Sequence[Any], lead: tuple[int, ...], what: str = "modules") -> Any:
    """Stack equal-structure modules along new leading axes `lead` (row-major), the inverse of `slice_layer`."""
    for k, m in enumerate(modules[1:], 1):
        why = _difference(modules[0], m)
        if why is not None:
            raise ValueError(f"{what}: item {k} ({type(m).__name__}) differs from item 0 "
                             f"({type(modules[0]).__name__}) in {why}; stacked layers must agree")
    parts = [eqx.partition(m, eqx.is_array) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *(a for a, _ in parts))
    return eqx.combine(stacked, parts[0][1])


def kind_ids(layers: Sequence[Any]) -> list[int]:
    """Layers that may share a stacked run get the same id (same structure, shapes, dtypes, static fields)."""
    reps: list[Any] = []
    ids = []
    for layer in layers:
        k = next((k for k, rep in enumerate(reps) if _difference(rep, layer) is None), None)
        if k is None:
            reps.append(layer)
            k = len(reps) - 1
        ids.append(k)
    return ids


# ---- the stack --------------------------------------------------------------------------------------------------
Step = Callable[[DecoderLayer, Any, Any], tuple[Any, Any]]


class DecoderStack(eqx.Module):
    """All decoder layers, stacked per run of the repeating layer pattern and applied with `lax.scan`.

    After surgery that regroups the layers (`g4.surgery`), `cache_slots` maps each flat layer to its entry in the
    stock KV-cache layout `(run, repeat, slot)`, so caches made by `KVCache.init` keep working; None means the
    stock layout.
    """

    runs: tuple[DecoderLayer, ...]  # run j: every array has leading axes [num_repeats, run_length_j]
    remat: Remat
    pattern: tuple[tuple[LayerKind, int], ...] = eqx.field(static=True)
    num_repeats: int = eqx.field(static=True)
    unroll: bool = eqx.field(static=True, default=False)
    cache_slots: tuple[Location, ...] | None = eqx.field(static=True, default=None)

    @classmethod
    def build(cls, cfg: TextConfig, *, key: PRNGKeyArray, dtype=jnp.float32, remat: bool | str | Remat = False,
              unroll: bool = False, numerics: Numerics = XLA(), kernel: AttentionKernel = XLAKernel()) -> DecoderStack:
        """The stock stack of `cfg`, randomly initialised."""
        pattern, repeats = layer_pattern(cfg.layer_types), layer_repeats(cfg.layer_types)
        runs = []
        for (kind, length), k in zip(pattern, jax.random.split(key, len(pattern))):
            make = lambda kk, kind=kind: DecoderLayer(cfg, kind, key=kk, dtype=dtype, numerics=numerics, kernel=kernel)
            runs.append(eqx.filter_vmap(eqx.filter_vmap(make))(jax.random.split(k, (repeats, length))))
        return cls(runs=tuple(runs), remat=as_remat(remat), pattern=pattern, num_repeats=repeats, unroll=unroll)

    # ---- layer indexing (checkpoint names use the flat HF index) ---------------------------------
    @property
    def period(self) -> int:
        return sum(c for _, c in self.pattern)

    @property
    def num_layers(self) -> int:
        return self.period * self.num_repeats

    def locate(self, layer_idx: int) -> Location:
        """Flat layer index -> (run, repeat, slot within the run)."""
        repeat, offset = divmod(layer_idx, self.period)
        for run, (_, length) in enumerate(self.pattern):
            if offset < length:
                return run, repeat, offset
            offset -= length
        raise IndexError(f"layer {layer_idx}: the stack has {self.num_layers} layers")

    def layer(self, layer_idx: int) -> DecoderLayer:
        """One layer as an unstacked module (a view, for inspection and surgery)."""
        run, repeat, slot = self.locate(layer_idx)
        return slice_layer(self.runs[run], repeat, slot)

    # ---- applying the layers ---------------------------------------------------------------------
    def __call__(
        self,
        h: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        masks: Mapping[str, Bool[Array, "seq seq"]],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """Every layer over a whole sequence. `band`: the sliding layers' mask is a pure window of that size (text
        only), which their attention may use to run in blocks (`layers.kernels.banded_attention`)."""

        def step(layer: DecoderLayer, h, _):
            return layer(h, positions, masks[layer.kind], band if layer.kind == LayerKind.SLIDING else None), None

        h, _ = scan_layers(self, h, step)
        return h

    def with_cache(
        self,
        h: Float[Array, "chunk hidden"],
        positions: Int[Array, " chunk"],
        kv_runs: tuple[LayerCache, ...],
        ctx: CacheContext,
    ) -> tuple[Float[Array, "chunk hidden"], tuple[LayerCache, ...]]:
        """Every layer over a chunk of new tokens with its KV cache (stock layout); returns the updated caches."""
        step = lambda layer, h, kv: layer.with_cache(h, positions, kv, ctx)
        if self.cache_slots is None or self.holds_own_layout(kv_runs):
            return scan_layers(self, h, step, kv_runs)
        # A regrouped stack: gather the stock cache into this stack's layout, run, and scatter it back.
        per_layer = [slice_layer(kv_runs[j], r, s) for j, r, s in self.cache_slots]
        mine = tuple(stack_modules([per_layer[i] for i in self.members(j)], (self.num_repeats, length), "cache")
                     for j, (_, length) in enumerate(self.pattern))
        h, mine = scan_layers(self, h, step, mine)
        updated = [slice_layer(mine[run], r, s) for run, r, s in map(self.locate, range(self.num_layers))]
        out = []
        for j, stock in enumerate(kv_runs):
            members = sorted((r, s, i) for i, (jj, r, s) in enumerate(self.cache_slots) if jj == j)
            lead = jax.tree.leaves(stock)[0].shape[:2]
            out.append(stack_modules([updated[i] for _, _, i in members], lead, "cache"))
        return h, tuple(out)

    def holds_own_layout(self, kv_runs: tuple[LayerCache, ...]) -> bool:
        """Whether a regrouped stack's cache entries are already in its own layout (`own_cache_layout`) rather
        than the stock one. The leading `[repeats, run_length]` shapes tell them apart: a stack whose runs had the
        stock lengths and repeats would have the stock layout and no `cache_slots`."""
        if self.cache_slots is None or len(kv_runs) != len(self.runs):
            return False
        return all(jax.tree.leaves(kv)[0].shape[:2] == (self.num_repeats, length)
                   for kv, (_, length) in zip(kv_runs, self.pattern))

    def own_cache_layout(self, kv_runs: tuple[LayerCache, ...]) -> tuple[LayerCache, ...]:
        """A regrouped stack's cache entries gathered once into its own layout, which `with_cache` then reads and
        writes in place (no gather and scatter per call: what a decode loop wants); stock or already converted
        entries come back as they are. `KVCache.truncate` and the masks do not depend on the layout."""
        if self.cache_slots is None or self.holds_own_layout(kv_runs):
            return kv_runs
        per_layer = [slice_layer(kv_runs[j], r, s) for j, r, s in self.cache_slots]
        return tuple(stack_modules([per_layer[i] for i in self.members(j)], (self.num_repeats, length), "cache")
                     for j, (_, length) in enumerate(self.pattern))

    def members(self, run: int) -> list[int]:
        """Flat indices of the layers stacked in `run`, in (repeat, slot) order."""
        return [i for i in range(self.num_layers) if self.locate(i)[0] == run]


def scan_layers(stack: DecoderStack, h: Any, step: Step, per_layer: tuple | None = None) -> tuple[Any, tuple]:
    """Apply `step(layer, h, x) -> (h, y)` to every layer in order, with `lax.scan` over the repeats and each run.

    `h`: the carry, the residual stream or a pytree holding it (taps carry their read buffers beside it).
    `per_layer`: per-run pytrees stacked `[repeats, run_length, ...]` like `stack.runs` (e.g. the KV cache's
    entries), sliced to the layer's `x`; None gives `x = None`. Returns the final `h` and the steps' `y`s, stacked
    the same way per run. Each layer body is rematerialised as the stack's `remat` policy says.
    """
    params, static = eqx.partition(stack.runs, eqx.is_array)
    xs = tuple(None for _ in stack.runs) if per_layer is None else tuple(per_layer)

    def run_body(static_layer) -> Callable:
        def body(h, inputs):
            layer_params, x = inputs
            return step(eqx.combine(layer_params, static_layer), h, x)
        return stack.remat.wrap(body)

    if stack.unroll:
        return _unrolled(stack, h, params, static, xs, run_body)

    def period(h, inputs):
        period_params, period_xs = inputs
        ys = []
        for run_params, static_layer, x in zip(period_params, static, period_xs):
            h, y = jax.lax.scan(run_body(static_layer), h, (run_params, x), unroll=stack.unroll)
            ys.append(y)
        return h, tuple(ys)

    return jax.lax.scan(period, h, (params, xs), unroll=stack.unroll)


def _unrolled(stack: DecoderStack, h: Any, params: tuple, static: tuple, xs: tuple, run_body: Callable
              ) -> tuple[Any, tuple]:
    """`scan_layers` for an unrolled stack (`g4.serving_layout`, `unroll=True`): a Python loop with static indices,
    so that each layer reads its weights and its cache entry where they lie. (A `lax.scan` of length one, even
    unrolled, made XLA:CPU copy each cache entry out and back on every decode step: benchmarks/RESULTS.md.)"""
    take = lambda tree, r, s: jax.tree.map(lambda a: a[r, s], tree)
    ys: list[list[Any]] = [[] for _ in stack.runs]
    for r in range(stack.num_repeats):
        for j, (run_params, static_layer, x) in enumerate(zip(params, static, xs)):
            for s in range(stack.pattern[j][1]):
                h, y = run_body(static_layer)(h, (take(run_params, r, s), None if x is None else take(x, r, s)))
                ys[j].append(y)
    lead = lambda j: (stack.num_repeats, stack.pattern[j][1])
    stacked = tuple(jax.tree.map(lambda *leaves, j=j: jnp.stack(leaves).reshape(lead(j) + leaves[0].shape), *run_ys)
                    for j, run_ys in enumerate(ys))
    return h, stacked
