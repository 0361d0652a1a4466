"""Checkpoint names of the NNX reference and `load` (docs/spec/decoder-and-checkpoint.md §2).

Every NNX parameter maps to exactly one on-disk tensor. The attribute paths already follow transformers' module
names, so the on-disk name is the path with the shared prefixes of `gemma4_eqx.checkpoint` and two renames:
NNX's `kernel` (stored `[in, out]`) is the PyTorch `weight` (stored `[out, in]`, hence transposed), and the token
table `embedding` is `embed_tokens.weight`. The vision projection lives on disk at top level
(`model.embed_vision.embedding_projection.weight`), not under `model.vision_embedder.` (docs/spec/decoder-and-checkpoint.md §2.3).
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..io import checkpoint as ckpt
from .model import Gemma4NNX

_PROJECTIONS = {
    ("embed_vision", "multimodal_embedder", "embedding_projection", "kernel"): ckpt.VISION_PROJECTION,
    ("embed_audio", "embedding_projection", "kernel"): ckpt.AUDIO_PROJECTION,
}


def disk_name(path: tuple) -> str:
    """On-disk tensor name of the NNX parameter at `path` (as `nnx.to_flat_state` spells it)."""
    if tuple(path) in _PROJECTIONS:
        return _PROJECTIONS[tuple(path)]
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    if parts[0] in ("embed_tokens", "layers", "norm"):
        return ckpt.TEXT_PREFIX + ".".join(parts)
    if parts[0] == "embed_vision":
        return ckpt.VISION_PREFIX + ".".join(parts[1:])
    raise KeyError(f"{'.'.join(parts)}: no checkpoint name for this parameter")


def _variable(model: Gemma4NNX, path: tuple) -> nnx.Param:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _param_paths(model: Gemma4NNX) -> list[tuple]:
    return [tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def named_params(model: Gemma4NNX) -> dict[str, nnx.Param]:
    """On-disk name -> the NNX parameter holding it (concrete or from `nnx.eval_shape`), every parameter once."""
    paths = _param_paths(model)
    out = {disk_name(path): _variable(model, path) for path in paths}
    if len(out) != len(paths):
        raise AssertionError("two NNX parameters map to the same checkpoint name")
    return out


def tensor_specs(model: Gemma4NNX) -> list[ckpt.TensorSpec]:
    """The checkpoint table of `model` in the shared `TensorSpec` form (for `checkpoint.validate`).

    `leaf` gets the NNX parameter; `transpose` marks the linear kernels (`[in, out]` here, `[out, in]` on disk).
    """
    specs = []
    for path in _param_paths(model):
        shape = tuple(_variable(model, path).get_value().shape)
        transpose = path[-1] == "kernel"
        specs.append(ckpt.TensorSpec(disk_name(path), lambda m, path=path: _variable(m, path), (), transpose,
                                     shape[::-1] if transpose else shape))
    return specs


def parameter_count(model: Gemma4NNX) -> int:
    """Number of parameter elements (the 48 `layer_scalar`s included; concrete or abstract model)."""
    return sum(math.prod(_variable(model, path).get_value().shape) for path in _param_paths(model))


def load(path_or_repo_id: str | os.PathLike, dtype=None, **hub_kwargs) -> Gemma4NNX:
    """A transformers-format checkpoint (folder or Hub id) as a `Gemma4NNX`.

    `dtype=None` keeps the checkpoint's precision; otherwise tensors are cast on load.
    """
    from ..io.hub import resolve
    from ..io.load import open_folder

    folder = resolve(path_or_repo_id, **hub_kwargs)
    opened = open_folder(folder)  # config.json and every shard opened together, as g4.load does
    try:
        config, reader = opened.config, opened.reader
        probe = nnx.eval_shape(lambda: Gemma4NNX(config, rngs=nnx.Rngs(0)))
        ckpt.validate(reader, tensor_specs(probe), dtype)
        if dtype is None:
            dtype = ckpt.checkpoint_dtype(reader, tensor_specs(probe))
        model = nnx.eval_shape(lambda: Gemma4NNX(config, rngs=nnx.Rngs(0), dtype=dtype))
        np_dtype = np.dtype(dtype)
        for spec in tensor_specs(model):
            t = reader.read(spec.name)
            t = t.T if spec.transpose else t
            spec.leaf(model).set_value(jnp.asarray(t.astype(np_dtype, copy=False)))
    finally:
        opened.close()
    return model
