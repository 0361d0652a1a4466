"""Checkpoint I/O: transformers-format safetensors in and out (spec §2).

The on-disk names are transformers' (`model.language_model.layers.5.self_attn.q_proj.weight`, ...). Linear
weights are stored PyTorch-style `[out, in]` and transposed to `[in, out]`. Per-layer tensors are gathered into
the decoder stack's `[repeats, run_length, ...]` arrays. The model is built abstractly with
`eqx.filter_eval_shape` (no weight is materialised twice) and filled with one `eqx.tree_at`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .config import Gemma4Config

TEXT_PREFIX = "model.language_model."
# On-disk names of the multimodal tensors and the names transformers uses after its load-time rename;
# the loader accepts both, the saver writes the on-disk ones (spec §2.3).
VISION_PREFIX = "model.vision_embedder."
VISION_ALIAS_PREFIX = "model.embed_vision."
VISION_PROJECTION = "model.embed_vision.embedding_projection.weight"
VISION_PROJECTION_ALIAS = "model.embed_vision.multimodal_embedder.embedding_projection.weight"
AUDIO_PROJECTION = "model.embed_audio.embedding_projection.weight"

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One on-disk tensor: where it lives in the Equinox tree and how it is laid out on disk."""

    name: str
    leaf: Callable[[Any], Any]  # model -> the (possibly stacked) array this tensor is part of
    index: tuple[int, ...]  # position inside a stacked leaf, () for unstacked leaves
    transpose: bool  # stored [out, in] on disk, [in, out] in the model
    shape: tuple[int, ...]  # on-disk shape


_LAYER_TENSORS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("input_layernorm.weight", lambda l: l.input_layernorm.weight, False),
    ("post_attention_layernorm.weight", lambda l: l.post_attention_layernorm.weight, False),
    ("pre_feedforward_layernorm.weight", lambda l: l.pre_feedforward_layernorm.weight, False),
    ("post_feedforward_layernorm.weight", lambda l: l.post_feedforward_layernorm.weight, False),
    ("layer_scalar", lambda l: l.layer_scalar, False),
    ("self_attn.q_proj.weight", lambda l: l.self_attn.q_proj.weight, True),
    ("self_attn.k_proj.weight", lambda l: l.self_attn.k_proj.weight, True),
    ("self_attn.v_proj.weight", lambda l: l.self_attn.v_proj.weight, True),
    ("self_attn.o_proj.weight", lambda l: l.self_attn.o_proj.weight, True),
    ("self_attn.q_norm.weight", lambda l: l.self_attn.q_norm.weight, False),
    ("self_attn.k_norm.weight", lambda l: l.self_attn.k_norm.weight, False),
    ("mlp.gate_proj.weight", lambda l: l.mlp.gate_proj.weight, True),
    ("mlp.up_proj.weight", lambda l: l.mlp.up_proj.weight, True),
    ("mlp.down_proj.weight", lambda l: l.mlp.down_proj.weight, True),
)

_VISION_TENSORS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("patch_ln1.weight", lambda v: v.patch_ln1.weight, False),
    ("patch_ln1.bias", lambda v: v.patch_ln1.bias, False),
    ("patch_dense.weight", lambda v: v.patch_dense.weight, True),
    ("patch_dense.bias", lambda v: v.patch_dense.bias, False),
    ("patch_ln2.weight", lambda v: v.patch_ln2.weight, False),
    ("patch_ln2.bias", lambda v: v.patch_ln2.bias, False),
    ("pos_embedding", lambda v: v.pos_embedding, False),
    ("pos_norm.weight", lambda v: v.pos_norm.weight, False),
    ("pos_norm.bias", lambda v: v.pos_norm.bias, False),
)


def _disk_shape(leaf_shape: tuple[int, ...], n_stack: int, transpose: bool) -> tuple[int, ...]:
    shape = tuple(leaf_shape[n_stack:])
    return shape[::-1] if transpose else shape


def tensor_specs(model) -> list[TensorSpec]:
    """Every on-disk tensor of `model` (concrete or abstract), in transformers' order."""
    specs: list[TensorSpec] = []
    add = lambda name, leaf, index, transpose: specs.append(
        TensorSpec(name, leaf, index, transpose, _disk_shape(leaf(model).shape, len(index), transpose)))
    add(TEXT_PREFIX + "embed_tokens.weight", lambda m: m.embed_tokens, (), False)
    stack = model.layers
    for i in range(stack.num_layers):
        run, repeat, slot = stack.locate(i)
        for suffix, get, transpose in _LAYER_TENSORS:
            if suffix.startswith("self_attn.v_proj") and stack.runs[run].self_attn.v_proj is None:
                continue  # full layers with attention_k_eq_v: values are the raw keys
            add(f"{TEXT_PREFIX}layers.{i}.{suffix}",
                lambda m, run=run, get=get: get(m.layers.runs[run]), (repeat, slot), transpose)
    add(TEXT_PREFIX + "norm.weight", lambda m: m.norm.weight, (), False)
    if model.embed_vision is not None:
        for suffix, get, transpose in _VISION_TENSORS:
            add(VISION_PREFIX + suffix, lambda m, get=get: get(m.embed_vision), (), transpose)
        add(VISION_PROJECTION, lambda m: m.embed_vision.projection.embedding_projection.weight, (), True)
    if model.embed_audio is not None:
        add(AUDIO_PROJECTION, lambda m: m.embed_audio.projection.embedding_projection.weight, (), True)
    return specs


def _canonical_name(name: str) -> str:
    """Map transformers' in-memory names (after its load-time rename) to the on-disk ones."""
    if name == VISION_PROJECTION_ALIAS:
        return VISION_PROJECTION
    if name.startswith(VISION_ALIAS_PREFIX) and name != VISION_PROJECTION:
        return VISION_PREFIX + name[len(VISION_ALIAS_PREFIX):]
    return name


# ---- reading -------------------------------------------------------------------------------------
class SafetensorsReader:
    """Lazily opened safetensors files of one checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index_path = os.path.join(folder, SAFE_INDEX)
        single_path = os.path.join(folder, SAFE_SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single_path):
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX} (only safetensors checkpoints "
                                    "are read; pickled .bin files are refused)")
        self._handles: dict[str, Any] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SAFE_SINGLE]
        self.location: dict[str, tuple[str, str]] = {}  # canonical name -> (file, name in file)
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {SAFE_INDEX} but missing")
            try:
                handle = safe_open(path, framework="np")
            except Exception as e:  # a truncated or corrupt file fails here
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
            self._handles[file] = handle
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(f"{name}: found in {file} but {SAFE_INDEX} places it in "
                                          f"{weight_map.get(name)!r}")
                canonical = _canonical_name(name)
                if canonical in self.location:
                    raise CheckpointError(f"{canonical}: stored twice ({self.location[canonical][1]!r} and {name!r})")
                self.location[canonical] = (file, name)
        if weight_map is not None:
            missing = sorted(set(map(_canonical_name, weight_map)) - set(self.location))
            if missing:
                raise CheckpointError(f"{missing[0]}: listed in {SAFE_INDEX} but not in its file")

    def names(self) -> set[str]:
        return set(self.location)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        file, stored = self.location[name]
        sl = self._handles[file].get_slice(stored)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str) -> np.ndarray:
        file, stored = self.location[name]
        try:
            return self._handles[file].get_tensor(stored)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read from {os.path.join(self.folder, file)} ({e})") from e


_SAFE_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16, "F64": jnp.float64}


def checkpoint_dtype(reader: SafetensorsReader, specs: list[TensorSpec]):
    """The single float dtype all tensors share (used when `load(dtype=None)`)."""
    first = specs[0].name
    _, d = reader.info(first)
    if d not in _SAFE_DTYPES:
        raise CheckpointError(f"{first}: expected a floating dtype (F32/BF16/F16), found {d}")
    return _SAFE_DTYPES[d]


def validate(reader: SafetensorsReader, specs: list[TensorSpec], dtype=None) -> None:
    """Every expected tensor present, none unexpected, each with its shape and a float dtype.

    With `dtype=None` (keep the checkpoint's precision) every tensor must also share the first tensor's dtype, so
    nothing is cast silently; pass `dtype=` to cast on load.
    """
    expected = {s.name for s in specs}
    found = reader.names()
    missing = sorted(expected - found)
    if missing:
        raise CheckpointError(f"{missing[0]}: missing from the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(found - expected)
    if unexpected:
        raise CheckpointError(f"{unexpected[0]}: unexpected tensor; the config describes no such parameter"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    first_dtype = reader.info(specs[0].name)[1]
    for s in specs:
        shape, d = reader.info(s.name)
        if shape != s.shape:
            raise CheckpointError(f"{s.name}: expected shape {s.shape}, found {shape}")
        if d not in _SAFE_DTYPES:
            raise CheckpointError(f"{s.name}: expected a floating dtype (F32/BF16/F16), found {d}")
        if dtype is None and d != first_dtype:
            raise CheckpointError(f"{s.name}: expected {first_dtype} like {specs[0].name}, found {d}; "
                                  "pass dtype= to cast the checkpoint on load")


def fill_model(abstract, reader: SafetensorsReader, dtype, place: Callable[[np.ndarray, Any], Any] | None = None,
               progress: Callable[[int], None] | None = None):
    """Fill an abstract model (from `filter_eval_shape`) with the checkpoint's tensors.

    Each model leaf is assembled host-side from its tensors (cast to `dtype`, transposed, stacked), handed to
    `place(array, abstract_leaf)` (default: `jnp.asarray`), and the host buffer is released before the next leaf.
    """
    specs = tensor_specs(abstract)
    validate(reader, specs, dtype)
    np_dtype = np.dtype(dtype)
    place = place or (lambda a, _: jnp.asarray(a))
    by_leaf: dict[int, list[TensorSpec]] = {}
    leaves: dict[int, Callable] = {}
    for s in specs:
        leaf_obj = s.leaf(abstract)
        by_leaf.setdefault(id(leaf_obj), []).append(s)
        leaves[id(leaf_obj)] = s.leaf
    wheres, values = [], []
    for key, group in by_leaf.items():
        get = leaves[key]
        target = get(abstract)
        buffer = np.empty(target.shape, np_dtype)
        for s in group:
            t = reader.read(s.name)
            if s.transpose:
                t = t.T
            buffer[s.index] = t.astype(np_dtype, copy=False)
            if progress is not None:
                progress(t.nbytes)
        values.append(place(buffer, target))
        del buffer
        wheres.append(get)
    return eqx.tree_at(lambda m: tuple(w(m) for w in wheres), abstract, replace=tuple(values))


# ---- writing -------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def host_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(on-disk name, `[out, in]` host array) for every tensor, one leaf fetched from device at a time."""
    specs = tensor_specs(model)
    cache_key, cache_val = None, None
    for s in specs:
        leaf = s.leaf(model)
        if cache_key is not leaf:
            cache_key, cache_val = leaf, np.asarray(jax.device_get(leaf))
        t = cache_val[s.index] if s.index else cache_val
        yield s.name, np.ascontiguousarray(t.T if s.transpose else t)


def write_safetensors(model, folder: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Write HF-named safetensors: one file, or shards plus `model.safetensors.index.json` above the size."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, t in host_tensors(model):
        if sizes[-1] and sizes[-1] + t.nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += t.nbytes
    for stale in (SAFE_SINGLE, SAFE_INDEX):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_SINGLE), metadata=metadata)
        return [SAFE_SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file(shard, os.path.join(folder, file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    with open(os.path.join(folder, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return files


def dtype_name(dtype) -> str:
    return {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float32): "float32",
            np.dtype(np.float16): "float16"}.get(np.dtype(dtype), str(np.dtype(dtype)))


def save(model, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write `config.json` and HF-named safetensors that transformers' `from_pretrained` loads."""
    folder = os.fspath(folder)
    write_safetensors(model, folder, max_shard_size=max_shard_size)
    model.config.save_pretrained(folder, dtype=dtype_name(model.dtype))


def load_from_folder(folder: str, *, dtype=None, place=None, progress=None, model_kwargs=None):
    from .model import Gemma4

    config = Gemma4Config.from_pretrained(folder)
    reader = SafetensorsReader(folder)
    model_kwargs = model_kwargs or {}
    probe = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), **model_kwargs))
    validate(reader, tensor_specs(probe), dtype)
    if dtype is None:
        dtype = checkpoint_dtype(reader, tensor_specs(probe))
    abstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **model_kwargs))
    return fill_model(abstract, reader, dtype, place=place, progress=progress)
