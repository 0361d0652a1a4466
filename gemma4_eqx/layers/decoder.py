"""One decoder layer (spec §3.3) and the scanned stack of layers.

Gemma 4's 48 layers are 8 repeats of one period (5 sliding + 1 full). Layers of the two kinds have different
shapes, so the stack keeps one stacked module per *run* of equal layers inside the period, with leading axes
`[repeats, run_length]`, and runs `lax.scan` over the repeats (and an inner scan over each run). The compiled
program therefore holds one sliding and one full layer body, whatever the depth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import TextConfig
from .attention import Attention

# Remat policies by name (`jax.checkpoint_policies`); `remat=True` is `jax.checkpoint`'s default (save nothing
# inside a layer body but its inputs). Only the policies that need no arguments can be named here.
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


def check_remat(remat: bool | str) -> bool | str:
    if isinstance(remat, bool) or remat in REMAT_POLICIES:
        return remat
    raise ValueError(f"remat: expected a bool or one of {REMAT_POLICIES} (jax.checkpoint_policies), found {remat!r}")


def rematerialised(body: Callable, remat: bool | str) -> Callable:
    """`body` under `jax.checkpoint` (with the named policy) when `remat` asks for it."""
    if remat is False:
        return body
    if remat is True:
        return jax.checkpoint(body)
    return jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, check_remat(remat)))
from .mlp import MLP
from .norm import RMSNorm


class DecoderLayer(eqx.Module):
    self_attn: Attention
    mlp: MLP
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    pre_feedforward_layernorm: RMSNorm
    post_feedforward_layernorm: RMSNorm
    layer_scalar: Float[Array, "1"]
    layer_type: str = eqx.field(static=True)

    def __init__(self, cfg: TextConfig, layer_type: str, *, key: PRNGKeyArray, dtype=jnp.float32):
        ka, km = jax.random.split(key)
        geometry = cfg.layer_geometry_for_type(layer_type)
        d, eps, std = cfg.hidden_size, cfg.rms_norm_eps, cfg.initializer_range
        self.self_attn = Attention(d, cfg.num_attention_heads, geometry, eps=eps, key=ka, std=std, dtype=dtype)
        self.mlp = MLP(d, cfg.intermediate_size, key=km, std=std, dtype=dtype)
        self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.pre_feedforward_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.post_feedforward_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.layer_scalar = jnp.ones((1,), dtype)
        self.layer_type = layer_type

    def __call__(
        self,
        h: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        mask: Bool[Array, "seq seq"],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """`band`: `mask` is a pure sliding window of that size (the stack passes it to stock attention only)."""
        x = self.input_layernorm(h)
        a = self.self_attn(x, positions, mask) if band is None else self.self_attn(x, positions, mask, band=band)
        return self.feed_forward(h, a)

    def with_cache(self, h: Float[Array, "seq hidden"], positions: Int[Array, " seq"], kv, ctx):
        """The same layer over a chunk of new tokens, reading and updating its KV cache entry."""
        a, kv = self.self_attn.with_cache(self.input_layernorm(h), positions, kv, ctx,
                                          sliding=self.layer_type == "sliding_attention")
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


def layer_pattern(layer_types: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], int]:
    """Split `layer_types` into its shortest repeating period, as runs `(type, length)`, and the repeat count."""
    n = len(layer_types)
    for period in range(1, n + 1):
        if n % period == 0 and layer_types == layer_types[:period] * (n // period):
            break
    runs: list[list[Any]] = []
    for t in layer_types[:period]:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return tuple((t, c) for t, c in runs), n // period


class DecoderStack(eqx.Module):
    """All decoder layers, stacked per run of the repeating layer pattern and applied with `lax.scan`."""

    runs: tuple[DecoderLayer, ...]  # run j: every array has leading axes [num_repeats, run_length_j]
    pattern: tuple[tuple[str, int], ...] = eqx.field(static=True)
    num_repeats: int = eqx.field(static=True)
    remat: bool | str = eqx.field(static=True, default=False)  # True, False or a name in REMAT_POLICIES
    unroll: bool = eqx.field(static=True, default=False)

    def __init__(self, cfg: TextConfig, *, key: PRNGKeyArray, dtype=jnp.float32, remat: bool | str = False,
                 unroll: bool = False):
        self.pattern, self.num_repeats = layer_pattern(cfg.layer_types)
        keys = jax.random.split(key, len(self.pattern))
        runs = []
        for (layer_type, length), k in zip(self.pattern, keys):
            make = lambda kk, t=layer_type: DecoderLayer(cfg, t, key=kk, dtype=dtype)
            ks = jax.random.split(k, (self.num_repeats, length))
            runs.append(eqx.filter_vmap(eqx.filter_vmap(make))(ks))
        self.runs = tuple(runs)
        self.remat = check_remat(remat)
        self.unroll = unroll

    # ---- layer indexing (checkpoint names use the flat HF index) ---------------------------------
    @property
    def period(self) -> int:
        return sum(c for _, c in self.pattern)

    def locate(self, layer_idx: int) -> tuple[int, int, int]:
        """Flat layer index -> (run, repeat, slot within the run)."""
        repeat, offset = divmod(layer_idx, self.period)
        for run, (_, length) in enumerate(self.pattern):
            if offset < length:
                return run, repeat, offset
            offset -= length
        raise AssertionError("unreachable")

    def layer(self, layer_idx: int) -> DecoderLayer:
        """One layer as an unstacked module (a view, for inspection and surgery)."""
        run, repeat, slot = self.locate(layer_idx)
        return jax.tree.map(lambda a: a[repeat, slot] if eqx.is_array(a) else a, self.runs[run])

    @property
    def num_layers(self) -> int:
        return self.period * self.num_repeats

    def __call__(
        self,
        h: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        masks: Mapping[str, Bool[Array, "seq seq"]],
        band: int | None = None,
    ) -> Float[Array, "seq hidden"]:
        """`band`: the sliding layers' mask is a pure window of that size (text only); their stock softmax
        attention then runs in blocks (`layers.attention.banded_attention`)."""
        params, static = eqx.partition(self.runs, eqx.is_array)

        def run_layer(static_layer) -> Callable:
            banded = static_layer.layer_type == "sliding_attention" and isinstance(static_layer.self_attn, Attention)

            def body(h, layer_params):
                layer = eqx.combine(layer_params, static_layer)
                return layer(h, positions, masks[layer.layer_type], band if banded else None), None
            return rematerialised(body, self.remat)

        def period(h, period_params):
            for run_params, static_layer in zip(period_params, static):
                h, _ = jax.lax.scan(run_layer(static_layer), h, run_params, unroll=self.unroll)
            return h, None

        h, _ = jax.lax.scan(period, h, params, unroll=self.unroll)
        return h

    def with_cache(self, h: Float[Array, "seq hidden"], positions: Int[Array, " seq"], kv_runs: tuple, ctx):
        """Apply every layer to a chunk of new tokens with its KV cache; returns (h, updated per-run caches)."""
        params, static = eqx.partition(self.runs, eqx.is_array)

        def run_layer(static_layer) -> Callable:
            def body(h, xs):
                layer_params, kv = xs
                h, kv = eqx.combine(layer_params, static_layer).with_cache(h, positions, kv, ctx)
                return h, kv
            return rematerialised(body, self.remat)

        def period(h, xs):
            period_params, period_kv = xs
            new_kv = []
            for run_params, static_layer, kv in zip(period_params, static, period_kv):
                h, kv = jax.lax.scan(run_layer(static_layer), h, (run_params, kv), unroll=self.unroll)
                new_kv.append(kv)
            return h, tuple(new_kv)

        h, kv_runs = jax.lax.scan(period, h, (params, tuple(kv_runs)), unroll=self.unroll)
        return h, kv_runs
