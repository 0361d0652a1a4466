"""Checkpoint reading: a transformers-format folder (safetensors, one file or shards plus an index) into a model.

Only plain file names inside the folder are opened: an index that names `../x`, an absolute path or a
sub-folder is refused before any file is touched, and every error while reading names the file.

Every file is opened through `utils.files.Folder` (`open_folder`): the folder once, then config.json, the index
and every shard relative to that descriptor, all before any tensor is read, and each tensor is read with `preadv`
from the descriptor whose header was parsed. A save replaces the whole folder in one exchange
(`io.save.replace_folder`), so a load sees the old folder whole or the new one whole: when the folder is swapped
while its files are being opened, the opening starts again (`FolderChangedError` after `OPEN_ATTEMPTS`). Symlinks
in the folder are followed only per `utils.files.FOLDER_LINK_RULE` (inside the folder, or a Hub cache snapshot's
links into its `blobs/`). Each tensor is checked finite as it is read (`check_finite=False` skips it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Gemma4Config
from ..config.fields import ConfigError, read_json_file
from ..model.gemma4 import Gemma4
from ..model.sharding import FSDP_TP, param_shardings, single_device
from ..utils.files import FileMissingError, Folder
from .names import TensorSpec, tensor_specs
from .reader import (
    CONFIG,
    FolderChangedError,
    SafetensorsReader,
    all_finite,
    checkpoint_dtype,
    float_dtype,
    nonfinite_error,
    validate,
)
from .safetensors import DTYPE_NAMES, aligned_empty

SAVE_MARK = ".g4-save-"  # `checkpoint_save` stages a folder `X` as the sibling `.X.g4-save-<token>`
PARTIAL_SUFFIX = ".partial"  # safetensors_io.write_file's name while a file is being written
OPEN_ATTEMPTS = 3  # openings of a folder that a concurrent save swapped meanwhile, before FolderChangedError


def leftovers(folder: str) -> list[str]:
    """What an interrupted save can leave: `.X.g4-save-*` beside the folder; `*.partial` and
    `config.json.<pid>.tmp` (`Gemma4Config.save_pretrained`) inside it."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder.rstrip(os.sep))
    found = []
    try:
        found += [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if e.startswith(f".{name}{SAVE_MARK}")]
    except OSError:
        pass
    try:
        found += [os.path.join(folder, e) for e in sorted(os.listdir(folder))
                  if e.endswith(PARTIAL_SUFFIX) or (e.startswith("config.json.") and e.endswith(".tmp"))]
    except OSError:
        pass
    return found


def warn_leftovers(folder: str) -> None:
    """Name the leftovers of an interrupted save (never read; safe to delete once no save is running)."""
    found = leftovers(folder)
    if found:
        warnings.warn(f"{folder}: leftovers of an interrupted or running save (not read; delete them once no save "
                      f"is running): {', '.join(found)}", stacklevel=3)


def _leaf_groups(abstract: Any, specs: list[TensorSpec]) -> list[tuple[Callable[[Any], Any], list[TensorSpec]]]:
    """The checkpoint tensors grouped by the model leaf they fill, in checkpoint order."""
    groups: dict[int, tuple[Callable, list[TensorSpec]]] = {}
    for s in specs:
        groups.setdefault(id(s.leaf(abstract)), (s.leaf, []))[1].append(s)
    return list(groups.values())


def assemble(reader: SafetensorsReader, group: list[TensorSpec], shape: tuple[int, ...], dtype: Any,
              index: tuple[slice, ...] | None = None, check_finite: bool = True) -> np.ndarray:
    """The part `index` (model coordinates; default all) of one model leaf, read from its checkpoint tensors.

    Each tensor contributes the rectangle of it that falls inside `index`: only those rows are read from disk,
    cast and transposed chunk by chunk straight into one page-aligned buffer of the part's shape. With
    `check_finite`, each tensor's part is checked as it lands (`NonFiniteError` naming the tensor and its file).
    """
    index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index or (slice(None),) * len(shape), shape))
    buffer = aligned_empty(tuple(sl.stop - sl.start for sl in index), dtype)
    for s in group:
        n_stack = len(s.index)
        outer, inner = index[:n_stack], index[n_stack:]
        if not all(sl.start <= i < sl.stop for i, sl in zip(s.index, outer)):
            continue
        dest = buffer[tuple(i - sl.start for i, sl in zip(s.index, outer))] if n_stack else buffer
        region = inner[::-1] if s.transpose else inner
        reader.read_into(s.name, dest, region, s.transpose)
        if check_finite and not all_finite(dest):
            stored = reader.read(s.name) if reader.info(s.name)[1] != DTYPE_NAMES.get(dest.dtype) else None
            raise nonfinite_error(dest.T if s.transpose else dest, s.name, reader.path(s.name), stored)
    return buffer


def _from_callback(reader: SafetensorsReader, group: list[TensorSpec], shape: tuple[int, ...], sharding: Any,
                   np_dtype: np.dtype, check_finite: bool = True) -> jax.Array:
    """`jax.make_array_from_callback`: each device's shard read on its own; equal shards (replicas) read once."""
    parts: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((sl.indices(n)[0], sl.indices(n)[1]) for sl, n in zip(index, shape))
        if key not in parts:
            parts[key] = assemble(reader, group, shape, np_dtype, index, check_finite)
        return parts[key]

    return jax.block_until_ready(jax.make_array_from_callback(shape, sharding, shard, dtype=np_dtype))


def _inner_sharding(sharding: Any, n_stack: int, ndim: int) -> Any:
    """The sharding of one layer's slice of a stacked leaf (the stacked axes are never split)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        if any(e is not None for e in spec[:n_stack]):
            raise ValueError(f"{sharding.spec}: the stacked leading axes of a decoder leaf cannot be sharded")
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[n_stack:]))
    return sharding


@functools.lru_cache(maxsize=None)
def layer_writer(sharding: Any) -> Callable[..., jax.Array]:
    """jit: write one layer's slice into a stacked leaf in place (the stack is donated), keeping its sharding."""

    def write(stack: jax.Array, piece: jax.Array, index: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(stack, piece.reshape((1,) * index.shape[0] + piece.shape),
                                            (*index, *(0,) * piece.ndim))

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _stacked_layer_by_layer(reader: SafetensorsReader, group: list[TensorSpec], target: Any, sharding: Any,
                            np_dtype: np.dtype, check_finite: bool = True) -> jax.Array:
    """A stacked leaf built on its devices one layer's tensor at a time: host memory stays at one tensor's shards."""
    n_stack = len(group[0].index)
    inner_shape = tuple(target.shape[n_stack:])
    inner = _inner_sharding(sharding, n_stack, len(target.shape))
    stack = jax.jit(lambda: jnp.zeros(target.shape, np_dtype), out_shardings=sharding)()
    write = layer_writer(sharding)
    for s in group:
        piece = _from_callback(reader, [dataclasses.replace(s, index=())], inner_shape, inner, np_dtype,
                               check_finite)
        stack = write(stack, piece, jnp.asarray(s.index, jnp.int32))
        del piece
    return jax.block_until_ready(stack)


def _on_host(sharding: Any) -> bool:
    return all(d.platform == "cpu" for d in sharding.device_set)


def fill_model(abstract: Any, reader: SafetensorsReader, dtype: Any,
               place: Callable[[np.ndarray, Any], Any] | None = None,
               progress: Callable[[int, int], None] | None = None, shardings: Any = None,
               layer_by_layer: bool | None = None, check_finite: bool = True) -> Any:
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
    `check_finite`: each tensor is checked as it is read (in the model's dtype, so a cast that overflows is caught
    too); one with NaN or infinite values raises `NonFiniteError` naming it and its file.
    """
    specs = tensor_specs(abstract)
    validate(reader, specs, dtype)
    np_dtype = np.dtype(dtype)
    if shardings is None and place is None:
        default = single_device()
        shardings = jax.tree.map(lambda _: default, abstract)
    wheres, values = [], []
    for get, group in _leaf_groups(abstract, specs):
        target = get(abstract)
        if shardings is None:
            value = place(assemble(reader, group, target.shape, np_dtype, check_finite=check_finite), target)
        else:
            sharding = get(shardings)
            by_layer = not _on_host(sharding) if layer_by_layer is None else layer_by_layer
            if by_layer and group[0].index:
                value = _stacked_layer_by_layer(reader, group, target, sharding, np_dtype, check_finite)
            else:
                value = _from_callback(reader, group, tuple(target.shape), sharding, np_dtype, check_finite)
        values.append(value)
        wheres.append(get)
        if progress is not None:
            progress(sum(reader.nbytes(s.name) for s in group), len(group))
    return eqx.tree_at(lambda m: tuple(w(m) for w in wheres), abstract, replace=tuple(values))



PROGRESS_MIN_BYTES = 2**30  # `progress=None` shows a bar only for checkpoints at least this large


def progress_callback(progress: Any, reader: SafetensorsReader,
                       specs: list[TensorSpec]) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
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


def open_checkpoint(folder: str, build: Callable[[Any], Any], dtype: Any = None, *,
                    reader: SafetensorsReader | None = None) -> tuple[SafetensorsReader, Any, Any]:
    """The start every loader shares: (reader, abstract model in its dtype, that dtype).

    `build(dtype)` makes the model (traced abstractly, nothing allocated). The checkpoint's tensors are checked
    against the model's names and shapes (`validate`) before the dtype is settled: `dtype=None` keeps the
    checkpoint's own (one float dtype for every tensor), anything else casts on load."""
    dtype = float_dtype(dtype)
    reader = SafetensorsReader(folder) if reader is None else reader
    probe = eqx.filter_eval_shape(lambda: build(jnp.float32))
    specs = tensor_specs(probe)
    validate(reader, specs, dtype)
    if dtype is None:
        dtype = checkpoint_dtype(reader, specs)
    if np.dtype(dtype) == np.dtype(np.float32):  # the probe is that model: not traced twice
        return reader, probe, dtype
    return reader, eqx.filter_eval_shape(lambda: build(dtype)), dtype


@dataclasses.dataclass
class OpenedFolder:
    """A checkpoint folder with config.json read and every safetensors file open (`open_folder`)."""

    folder: str
    config_path: str
    raw_config: Any  # config.json's JSON value
    config: Any  # what `parse(raw_config, config_path)` made of it
    reader: SafetensorsReader

    def close(self) -> None:
        self.reader.close()


def gemma4_config(raw: Any, path: str) -> Gemma4Config:
    """config.json's JSON value as a `Gemma4Config`; `ConfigError` naming the file and the field."""
    try:
        return Gemma4Config.from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def open_folder(folder: str | os.PathLike, parse: Callable[[Any, str], Any] = gemma4_config) -> OpenedFolder:
    """config.json read and parsed (`parse(value, path)`, whose errors come first) and every safetensors file
    opened, all through one descriptor of the folder and before any tensor is read (see the module docstring).

    A folder that a concurrent save swapped while it was being opened is opened again, up to `OPEN_ATTEMPTS`
    times (then `FolderChangedError`). No config.json: FileNotFoundError ("no config.json at ...")."""
    folder = os.fspath(folder)
    for attempt in range(OPEN_ATTEMPTS):
        with Folder(folder, "a checkpoint folder") as d:
            try:
                try:
                    raw = read_json_file(CONFIG, ConfigError, folder=d)
                except FileMissingError:
                    raise FileMissingError(f"no {CONFIG} at {d.join(CONFIG)}") from None
                config = parse(raw, d.join(CONFIG))
                reader = SafetensorsReader(d)
            except Exception as e:
                if not d.replaced():
                    raise
                if attempt + 1 == OPEN_ATTEMPTS:
                    raise FolderChangedError(
                        f"{folder}: replaced by another process (a save) while it was being opened, "
                        f"{OPEN_ATTEMPTS} times; nothing was read. Load it again once the save is done "
                        f"({type(e).__name__}: {e})") from e
                continue
        return OpenedFolder(folder, d.join(CONFIG), raw, config, reader)
    raise AssertionError("unreachable")


def load_float_folder(folder: str, *, dtype: Any = None, place: Callable[[np.ndarray, Any], Any] | None = None,
                      progress: Any = None, model_kwargs: dict[str, Any] | None = None, mesh: Any = None,
                      rules: Any = None, layer_by_layer: bool | None = None, check_finite: bool = True,
                      opened: OpenedFolder | None = None) -> Any:
    """A float checkpoint folder as a `Gemma4`: on the default device, through `place`, or sharded over `mesh`.
    `opened`: the folder already opened by `open_folder` (closed here either way)."""
    opened = open_folder(folder) if opened is None else opened
    try:
        config, reader = opened.config, opened.reader
        kwargs = model_kwargs or {}
        reader, abstract, dtype = open_checkpoint(
            folder, lambda dt: Gemma4(config, key=jax.random.key(0), dtype=dt, **kwargs), dtype, reader=reader)
        shardings = None
        if mesh is not None:
            shardings = param_shardings(abstract, mesh, FSDP_TP if rules is None else rules)
        elif rules is not None:
            raise ValueError("rules: given without a mesh; pass mesh=g4.sharding.make_mesh(...) as well")
        update, close = progress_callback(progress, reader, tensor_specs(abstract))
        try:
            return fill_model(abstract, reader, dtype, place=place, progress=update, shardings=shardings,
                              layer_by_layer=layer_by_layer, check_finite=check_finite)
        finally:
            close()
    finally:
        opened.close()
