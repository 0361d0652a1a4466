"""Checkpoint I/O: transformers-format safetensors in and out (spec §2).

The on-disk names are transformers' (`model.language_model.layers.5.self_attn.q_proj.weight`, ...). Linear
weights are stored PyTorch-style `[out, in]` and transposed to `[in, out]`. Per-layer tensors are gathered into
the decoder stack's `[repeats, run_length, ...]` arrays. The model is built abstractly with
`eqx.filter_eval_shape` (no weight is materialised twice) and filled with one `eqx.tree_at`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .config import Gemma4Config
from .layers.attention import Attention
from .layers.linear import Linear
from .layers.mlp import MLP
from .safetensors_io import DTYPE_NAMES, SafetensorsFile, aligned_empty, write_file

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


# The modules of a decoder layer that carry transformers' names, and what each must be.
_STOCK_MODULES: tuple[tuple[str, type, str], ...] = (
    ("self_attn", Attention, "a standard Gemma 4 attention layer (gemma4_eqx.layers.attention.Attention)"),
    ("mlp", MLP, "the standard Gemma 4 MLP (gemma4_eqx.layers.mlp.MLP)"),
    *((f"self_attn.{p}", Linear, "a plain Linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *((f"mlp.{p}", Linear, "a plain Linear") for p in ("gate_proj", "up_proj", "down_proj")),
)


def _check_stock_run(stack, run: int) -> None:
    """Only the stock modules have checkpoint names: name the first module of a run that is not one (e.g. after
    `g4.surgery.replace_attention` or `add_lora`) instead of failing on a missing attribute."""
    layers = [i for i in range(stack.num_layers) if stack.locate(i)[0] == run]
    for path, cls, what in _STOCK_MODULES:
        module = stack.runs[run]
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is None and path == "self_attn.v_proj":
            continue  # full layers with attention_k_eq_v
        if not isinstance(module, cls):
            hint = ("fold adapters in with g4.surgery.merge_lora(model) first, or save the edited model with "
                    "g4.surgery.save" if cls is Linear else
                    "save the edited model with g4.surgery.save (read it back with g4.surgery.load)")
            raise CheckpointError(
                f"{TEXT_PREFIX}layers.{layers[0]}.{path} (model.layers.runs[{run}].{path}, layers {layers}): "
                f"expected {what}, found {type(module).__name__}; only the stock modules have transformers' "
                f"checkpoint names, and g4.save does not drop parameters that have none. To save this model, "
                f"{hint}")


def tensor_specs(model) -> list[TensorSpec]:
    """Every on-disk tensor of `model` (concrete or abstract), in transformers' order."""
    specs: list[TensorSpec] = []

    def add(name, leaf, index, transpose):
        try:
            shape = leaf(model).shape
        except AttributeError as e:  # a module swapped for one without this parameter
            raise CheckpointError(f"{name}: the model has no such parameter ({e}); only a stock Gemma 4 model "
                                  "has transformers' checkpoint names (see g4.surgery.save)") from e
        specs.append(TensorSpec(name, leaf, index, transpose, _disk_shape(shape, len(index), transpose)))

    add(TEXT_PREFIX + "embed_tokens.weight", lambda m: m.embed_tokens, (), False)
    stack = model.layers
    for run in range(len(stack.runs)):
        _check_stock_run(stack, run)
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
    """The safetensors files of one checkpoint folder (single file or sharded with an index).

    Headers are parsed up front; tensor bytes are read on demand with `preadv`, never memory-mapped (see
    `safetensors_io`), so reading a checkpoint does not leave its pages in this process's resident memory.
    """

    def __init__(self, folder: str):
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
        self._files: dict[str, SafetensorsFile] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SAFE_SINGLE]
        self.location: dict[str, tuple[str, str]] = {}  # canonical name -> (file, name in file)
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {SAFE_INDEX} but missing")
            try:
                handle = SafetensorsFile(path)
            except Exception as e:  # a truncated or corrupt file fails here
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
            self._files[file] = handle
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
        return self._files[file].shape(stored), self._files[file].dtype_name(stored)

    def nbytes(self, name: str) -> int:
        file, stored = self.location[name]
        return self._files[file].nbytes(stored)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a new host array in its stored dtype."""
        file, stored = self.location[name]
        try:
            return self._files[file].read(stored)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read from {os.path.join(self.folder, file)} ({e})") from e

    def read_into(self, name: str, out: np.ndarray, region=None, transpose: bool = False) -> None:
        """The tensor's `region` (on-disk coordinates, default all of it) cast into `out`, transposed if asked."""
        file, stored = self.location[name]
        try:
            self._files[file].read_into(stored, out, region, transpose)
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


def _leaf_groups(abstract, specs: list[TensorSpec]) -> list[tuple[Callable[[Any], Any], list[TensorSpec]]]:
    """The checkpoint tensors grouped by the model leaf they fill, in checkpoint order."""
    groups: dict[int, tuple[Callable, list[TensorSpec]]] = {}
    for s in specs:
        groups.setdefault(id(s.leaf(abstract)), (s.leaf, []))[1].append(s)
    return list(groups.values())


def _assemble(reader: SafetensorsReader, group: list[TensorSpec], shape: tuple[int, ...], dtype,
              index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The part `index` (model coordinates; default all) of one model leaf, read from its checkpoint tensors.

    Each tensor contributes the rectangle of it that falls inside `index`: only those rows are read from disk,
    cast and transposed chunk by chunk straight into one page-aligned buffer of the part's shape.
    """
    index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index or (slice(None),) * len(shape), shape))
    buffer = aligned_empty(tuple(sl.stop - sl.start for sl in index), dtype)
    for s in group:
        n_stack = len(s.index)
        outer, inner = index[:n_stack], index[n_stack:]
        if not all(sl.start <= i < sl.stop for i, sl in zip(s.index, outer)):
            continue
        dest = buffer[tuple(i - sl.start for i, sl in zip(s.index, outer))] if n_stack else buffer
        reader.read_into(s.name, dest, inner[::-1] if s.transpose else inner, s.transpose)
    return buffer


def _from_callback(reader: SafetensorsReader, group: list[TensorSpec], shape: tuple[int, ...], sharding, np_dtype):
    """`jax.make_array_from_callback`: each device's shard read on its own; equal shards (replicas) read once."""
    parts: dict[tuple, np.ndarray] = {}

    def shard(index):
        key = tuple((sl.indices(n)[0], sl.indices(n)[1]) for sl, n in zip(index, shape))
        if key not in parts:
            parts[key] = _assemble(reader, group, shape, np_dtype, index)
        return parts[key]

    return jax.block_until_ready(jax.make_array_from_callback(shape, sharding, shard, dtype=np_dtype))


def _inner_sharding(sharding, n_stack: int, ndim: int):
    """The sharding of one layer's slice of a stacked leaf (the stacked axes are never split)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        if any(e is not None for e in spec[:n_stack]):
            raise ValueError(f"{sharding.spec}: the stacked leading axes of a decoder leaf cannot be sharded")
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[n_stack:]))
    return sharding


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    """jit: write one layer's slice into a stacked leaf in place (the stack is donated), keeping its sharding."""

    def write(stack, piece, index):
        return jax.lax.dynamic_update_slice(stack, piece.reshape((1,) * index.shape[0] + piece.shape),
                                            (*index, *(0,) * piece.ndim))

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _stacked_layer_by_layer(reader, group: list[TensorSpec], target, sharding, np_dtype):
    """A stacked leaf built on its devices one layer's tensor at a time: host memory stays at one tensor's shards."""
    n_stack = len(group[0].index)
    inner_shape = tuple(target.shape[n_stack:])
    inner = _inner_sharding(sharding, n_stack, len(target.shape))
    stack = jax.jit(lambda: jnp.zeros(target.shape, np_dtype), out_shardings=sharding)()
    write = _layer_writer(sharding)
    for s in group:
        piece = _from_callback(reader, [dataclasses.replace(s, index=())], inner_shape, inner, np_dtype)
        stack = write(stack, piece, jnp.asarray(s.index, jnp.int32))
        del piece
    return jax.block_until_ready(stack)


def _on_host(sharding) -> bool:
    return all(d.platform == "cpu" for d in sharding.device_set)


def fill_model(abstract, reader: SafetensorsReader, dtype, place: Callable[[np.ndarray, Any], Any] | None = None,
               progress: Callable[[int, int], None] | None = None, shardings=None,
               layer_by_layer: bool | None = None):
    """Fill an abstract model (from `filter_eval_shape`) with the checkpoint's tensors, one leaf at a time.

    Placement, in order of precedence:
    - `shardings` (a pytree like the model with a `jax.sharding.Sharding` per leaf, e.g. from
      `g4.sharding.param_shardings`): every device's shard is read from disk on its own (only its rows; equal
      shards once), through `jax.make_array_from_callback`;
    - `place(array, abstract_leaf)`: the whole leaf is assembled on the host and handed over;
    - neither: the leaf goes to the default device.
    Host buffers are page-aligned, which lets JAX's CPU backend adopt them without a copy, so a model on the CPU
    costs its own bytes and one read chunk. A stacked decoder leaf that lives on accelerators
    (`layer_by_layer=None`; force with True/False) is instead allocated on its devices and filled one layer's
    tensor at a time (in place, the stack donated), so host memory stays near one tensor's shards rather than a
    whole stacked leaf. Each leaf is finished (`block_until_ready`) before the next is read.
    `progress(nbytes, ntensors)` is called after each leaf with the on-disk bytes and checkpoint tensors it used.
    """
    specs = tensor_specs(abstract)
    validate(reader, specs, dtype)
    np_dtype = np.dtype(dtype)
    if shardings is None and place is None:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: default, abstract)
    wheres, values = [], []
    for get, group in _leaf_groups(abstract, specs):
        target = get(abstract)
        if shardings is None:
            value = place(_assemble(reader, group, target.shape, np_dtype), target)
        else:
            sharding = get(shardings)
            by_layer = not _on_host(sharding) if layer_by_layer is None else layer_by_layer
            if by_layer and group[0].index:
                value = _stacked_layer_by_layer(reader, group, target, sharding, np_dtype)
            else:
                value = _from_callback(reader, group, tuple(target.shape), sharding, np_dtype)
        values.append(value)
        wheres.append(get)
        if progress is not None:
            progress(sum(reader.nbytes(s.name) for s in group), len(group))
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


@jax.jit
def _take_layer(leaf, index):
    """One layer's slice of a stacked leaf, on the leaf's devices (traced indices: one compile per leaf shape)."""
    n = index.shape[0]
    start = (*index, *(0,) * (leaf.ndim - n))
    return jax.lax.dynamic_slice(leaf, start, (1,) * n + leaf.shape[n:]).reshape(leaf.shape[n:])


def host_tensors(model, specs: list[TensorSpec] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(on-disk name, `[out, in]` host array) for every tensor, fetched from its devices one tensor at a time.

    A stacked leaf is sliced on its devices first, so a sharded model is gathered one layer's tensor at a time.
    """
    for s in specs if specs is not None else tensor_specs(model):
        leaf = s.leaf(model)
        t = leaf if not s.index else _take_layer(leaf, np.asarray(s.index, np.int32))
        t = np.asarray(jax.device_get(t))
        yield s.name, np.ascontiguousarray(t.T if s.transpose else t)


_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def write_safetensors(model, folder: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Write HF-named safetensors: one file, or shards plus `model.safetensors.index.json` above the size.

    The file layout is planned from the shapes alone; tensors are then fetched and written one at a time, so host
    memory stays near the largest tensor whatever the model's size or sharding.
    """
    os.makedirs(folder, exist_ok=True)
    limit = _parse_size(max_shard_size)
    specs = tensor_specs(model)
    shards: list[list[tuple[TensorSpec, str]]] = [[]]
    sizes = [0]
    for s in specs:
        dtype = np.dtype(s.leaf(model).dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{s.name}: dtype {dtype} cannot be written to safetensors")
        nbytes = math.prod(s.shape) * dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((s, DTYPE_NAMES[dtype]))
        sizes[-1] += nbytes
    for stale in os.listdir(folder):
        if stale in (SAFE_SINGLE, SAFE_INDEX) or _SHARD_FILE.match(stale):
            os.remove(os.path.join(folder, stale))
    metadata = {"format": "pt"}
    files = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        layout = [(s.name, d, s.shape) for s, d in shard]
        write_file(os.path.join(folder, file), layout, host_tensors(model, [s for s, _ in shard]), metadata)
        weight_map.update({s.name: file for s, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return files


def dtype_name(dtype) -> str:
    return {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float32): "float32",
            np.dtype(np.float16): "float16"}.get(np.dtype(dtype), str(np.dtype(dtype)))


def save(model, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write `config.json` and HF-named safetensors that transformers' `from_pretrained` loads.

    Works on a model sharded over a mesh too: each tensor is gathered to the host on its own as it is written.
    """
    folder = os.fspath(folder)
    write_safetensors(model, folder, max_shard_size=max_shard_size)
    model.config.save_pretrained(folder, dtype=dtype_name(model.dtype))


PROGRESS_MIN_BYTES = 2**30  # `progress=None` shows a bar only for checkpoints at least this large


def _progress_callback(progress, reader: SafetensorsReader, specs: list[TensorSpec]):
    """(callback, close) for `progress`: True/False, None (auto: on from PROGRESS_MIN_BYTES) or a callable."""
    if callable(progress):
        return (lambda nbytes, ntensors: progress(nbytes)), (lambda: None)
    total = sum(reader.nbytes(s.name) for s in specs)
    if progress is False or (progress is None and total < PROGRESS_MIN_BYTES):
        return None, (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", leave=False)
    done = [0]

    def update(nbytes: int, ntensors: int) -> None:
        done[0] += ntensors
        bar.set_postfix_str(f"{done[0]}/{len(specs)} tensors", refresh=False)
        bar.update(nbytes)

    return update, bar.close


def load_from_folder(folder: str, *, dtype=None, place=None, progress=None, model_kwargs=None, mesh=None,
                     rules=None, layer_by_layer: bool | None = None):
    """A checkpoint folder as a `Gemma4`: on the default device, through `place`, or sharded over `mesh`."""
    from .model import Gemma4

    config = Gemma4Config.from_pretrained(folder)
    reader = SafetensorsReader(folder)
    model_kwargs = model_kwargs or {}
    probe = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), **model_kwargs))
    specs = tensor_specs(probe)
    validate(reader, specs, dtype)
    if dtype is None:
        dtype = checkpoint_dtype(reader, specs)
    abstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **model_kwargs))
    shardings = None
    if mesh is not None:
        from . import sharding

        shardings = sharding.param_shardings(abstract, mesh, sharding.FSDP_TP if rules is None else rules)
    elif rules is not None:
        raise ValueError("rules: given without a mesh; pass mesh=g4.sharding.make_mesh(...) as well")
    update, close = _progress_callback(progress, reader, specs)
    try:
        return fill_model(abstract, reader, dtype, place=place, progress=update, shardings=shardings,
                          layer_by_layer=layer_by_layer)
    finally:
        close()
