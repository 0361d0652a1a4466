"""Carry every parameter between the Equinox `Gemma4` and the NNX reference `Gemma4NNX`.

Both sides are keyed by the on-disk checkpoint names (`gemma4_eqx.checkpoint.tensor_specs` for Equinox,
`gemma4_eqx.nnx.named_params` for NNX), and both store linear weights `[in, out]`, so a tensor moves as is:
bit for bit, no transpose, no cast. The Equinox side stacks decoder layers per run of the repeating layer
pattern (`DecoderStack.locate`); each `TensorSpec.index` says where one NNX layer's tensor sits in that stack.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

from .io import checkpoint as ckpt
from .model.gemma4 import Gemma4
from .nnx import Gemma4NNX, named_params


def _check_names(eqx_names: set[str], nnx_names: set[str]) -> None:
    only_eqx, only_nnx = sorted(eqx_names - nnx_names), sorted(nnx_names - eqx_names)
    if only_eqx:
        raise ValueError(f"{only_eqx[0]}: in the Equinox model but not in the NNX model")
    if only_nnx:
        raise ValueError(f"{only_nnx[0]}: in the NNX model but not in the Equinox model")


def _stack(values: dict[tuple[int, ...], jax.Array], lead: tuple[int, ...], at: tuple[int, ...] = ()) -> jax.Array:
    """Nest `jnp.stack` over the leading (repeat, slot) axes of a stacked leaf."""
    if len(at) == len(lead):
        return values[at]
    return jnp.stack([_stack(values, lead, at + (i,)) for i in range(lead[len(at)])])


def from_nnx(ref: Gemma4NNX, **model_kwargs) -> Gemma4:
    """An Equinox `Gemma4` holding exactly `ref`'s parameters (`model_kwargs`: e.g. `remat=True`)."""
    config, dtype = ref.config, ref.dtype
    abstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **model_kwargs))
    specs = ckpt.tensor_specs(abstract)
    params = named_params(ref)
    _check_names({s.name for s in specs}, set(params))
    groups: dict[int, list[ckpt.TensorSpec]] = {}
    for s in specs:
        groups.setdefault(id(s.leaf(abstract)), []).append(s)
    wheres, values = [], []
    for group in groups.values():
        target = group[0].leaf(abstract)
        n_stack = len(group[0].index)
        parts = {}
        for s in group:
            value = params[s.name][...]
            expected = tuple(target.shape[n_stack:])
            if value.shape != expected or value.dtype != target.dtype:
                raise ValueError(f"{s.name}: the Equinox model expects {expected} {target.dtype}, the NNX model holds "
                                 f"{tuple(value.shape)} {value.dtype}")
            parts[s.index] = value
        lead = tuple(target.shape[:n_stack])
        if len(parts) != math.prod(lead):
            raise ValueError(f"{group[0].name}: its stacked leaf {tuple(target.shape)} is not fully covered")
        values.append(_stack(parts, lead))
        wheres.append(group[0].leaf)
    model = eqx.tree_at(lambda m: tuple(w(m) for w in wheres), abstract, replace=tuple(values))
    left = [x for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct)]
    if left:
        raise AssertionError(f"{len(left)} Equinox leaves were not filled from the NNX model")
    return model


def to_nnx(model: Gemma4) -> Gemma4NNX:
    """A `Gemma4NNX` holding exactly `model`'s parameters."""
    config, dtype = model.config, model.dtype
    ref = nnx.eval_shape(lambda: Gemma4NNX(config, rngs=nnx.Rngs(0), dtype=dtype))
    params = named_params(ref)
    specs = ckpt.tensor_specs(model)
    _check_names({s.name for s in specs}, set(params))
    for s in specs:
        leaf = s.leaf(model)
        value = leaf[s.index] if s.index else leaf
        param = params[s.name]
        expected = param.get_value()
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise ValueError(f"{s.name}: the NNX model expects {tuple(expected.shape)} {expected.dtype}, the Equinox "
                             f"model holds {tuple(value.shape)} {value.dtype}")
        param.set_value(value)
    left = [n for n, p in params.items() if isinstance(p.get_value(), jax.ShapeDtypeStruct)]
    if left:
        raise AssertionError(f"{left[0]}: not filled from the Equinox model")
    return ref
