"""The safetensors files of one checkpoint folder: shard names confined to the folder, the index, each file held
open from the descriptor its header was parsed with (`SafetensorsReader`), the checks of what a model expects
(`validate`, `checkpoint_dtype`, `float_dtype`) and of finite values (`all_finite`, `NonFiniteError`).

Loading a model from them is `load.py`; the folder-level protocol (one descriptor, a concurrent save) is described
there.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config.fields import read_json_file, short
from ..utils.files import FileMissingError, FileReadError, Folder
from .names import SAFE_INDEX, SAFE_SINGLE, CheckpointError, TensorSpec, canonical_name
from .safetensors import SafetensorsFile

CONFIG = "config.json"
MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json (the 12B's: ~80 kB)


class FolderChangedError(CheckpointError):
    """The folder was replaced (a concurrent save) while its files were being opened, `OPEN_ATTEMPTS` times."""


class NonFiniteError(CheckpointError):
    """A tensor holding NaN or infinite values (`g4.load(..., check_finite=False)` loads it anyway)."""


def check_shard_name(name: Any, where: str) -> str:
    """A shard name from an index must be a plain `.safetensors` file name inside the folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or os.path.basename(name) != name or not name.endswith(".safetensors")):
        raise CheckpointError(f"{where}: expected a plain file name inside the checkpoint folder ending in "
                              f".safetensors, found {short(name, 80)}; shard paths that leave the folder are refused")
    return name


def read_index(folder: str | Folder) -> dict[str, str]:
    """`model.safetensors.index.json`'s `weight_map` (tensor name -> shard file name), every entry checked."""
    if not isinstance(folder, Folder):
        with Folder(folder, "a checkpoint folder") as opened:
            return read_index(opened)
    path = folder.join(SAFE_INDEX)
    index = read_json_file(SAFE_INDEX, CheckpointError, MAX_INDEX_BYTES, folder=folder)
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: expected a JSON object with a 'weight_map', found {type(index).__name__}")
    if "weight_map" not in index:
        raise CheckpointError(f"{path}: the field 'weight_map' is missing")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: weight_map: expected a non-empty object of tensor name -> file name, "
                              f"found {short(weight_map, 80)}")
    for name, file in weight_map.items():
        check_shard_name(file, f"{path}: weight_map[{short(name, 80)}]")
    return weight_map


def float_dtype(dtype: Any) -> Any:
    """`dtype` as a numpy dtype if it is a floating one; None stays None (keep the checkpoint's precision)."""
    if dtype is None:
        return None
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype: expected a floating dtype (float32, bfloat16 or float16), found {dtype!r}") from e
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"dtype: expected a floating dtype (float32, bfloat16 or float16), found {d.name}; "
                         "casting the weights to it would truncate them")
    if jax.dtypes.canonicalize_dtype(d) != d:
        raise ValueError(f"dtype: {d.name} needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)); "
                         "without it the weights would silently become float32")
    return d


class SafetensorsReader:
    """The safetensors files of one checkpoint folder (single file or sharded with an index).

    Every file is opened (through `utils.files.Folder`) and its header parsed up front; tensor bytes are read on
    demand with `preadv` from those descriptors, never memory-mapped (see `io.safetensors`), so reading a
    checkpoint does not leave its pages in this process's resident memory, and a file replaced on disk after the
    reader opened it is never read. `close()` closes the files (garbage collection does too).
    """

    def __init__(self, folder: str | Folder, *, exclude: set[str] | frozenset[str] = frozenset()):
        """`folder`: a path, or a `Folder` already open (its files opened relative to it). `exclude`: stored names
        left out of `names()` (read on their own, e.g. an integer buffer)."""
        self.exclude = frozenset(exclude)
        self._files: dict[str, SafetensorsFile] = {}
        if not isinstance(folder, Folder):
            with Folder(folder, "a checkpoint folder") as opened:
                self._open(opened)
        else:
            self._open(folder)

    def _open(self, d: Folder) -> None:
        folder = self.folder = d.path
        index_path = d.join(SAFE_INDEX)
        if d.exists(SAFE_INDEX):
            weight_map = read_index(d)
        elif d.exists(SAFE_SINGLE):
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX} (only safetensors checkpoints "
                                    "are read; pickled .bin files are refused)")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SAFE_SINGLE]
        self.location: dict[str, tuple[str, str]] = {}  # canonical name -> (file, name in file)
        try:
            for file in files:
                path = d.join(file)
                try:
                    opened = d.open(file, "a safetensors file")
                except FileMissingError as e:
                    raise FileNotFoundError(f"{path}: listed in {index_path} but missing" if weight_map is not None
                                            else str(e)) from None
                except FileReadError as e:
                    raise CheckpointError(str(e)) from None
                try:
                    handle = SafetensorsFile(path, opened)
                except Exception as e:  # a truncated or corrupt file fails here
                    opened.close()
                    raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
                self._files[file] = handle
                for name in handle.keys():
                    if weight_map is not None and weight_map.get(name) != file:
                        raise CheckpointError(f"{name}: found in {path} but {index_path} places it in "
                                              f"{weight_map.get(name)!r}")
                    canonical = canonical_name(name)
                    if canonical in self.location:
                        raise CheckpointError(f"{canonical}: stored twice ({self.location[canonical][1]!r} and "
                                              f"{name!r})")
                    self.location[canonical] = (file, name)
            if weight_map is not None:
                missing = sorted(set(map(canonical_name, weight_map)) - set(self.location))
                if missing:
                    raise CheckpointError(f"{missing[0]}: listed in {index_path} but not in its file")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every file (a closed reader reads nothing more)."""
        for handle in self._files.values():
            handle.close()

    def path(self, name: str) -> str:
        """The file that holds the tensor `name` (for messages)."""
        return os.path.join(self.folder, self.location[name][0])

    def names(self) -> set[str]:
        return set(self.location) - self.exclude

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

    def read_into(self, name: str, out: np.ndarray, region: tuple[slice, ...] | None = None,
                  transpose: bool = False) -> None:
        """The tensor's `region` (on-disk coordinates, default all of it) cast into `out`, transposed if asked."""
        file, stored = self.location[name]
        try:
            self._files[file].read_into(stored, out, region, transpose)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read from {os.path.join(self.folder, file)} ({e})") from e


_SAFE_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16, "F64": jnp.float64}


def checkpoint_dtype(reader: SafetensorsReader, specs: list[TensorSpec]) -> Any:
    """The single float dtype all tensors share (used when `load(dtype=None)`)."""
    first = specs[0].name
    _, d = reader.info(first)
    if d not in _SAFE_DTYPES:
        raise CheckpointError(f"{first}: expected a floating dtype (F32/BF16/F16), found {d}")
    return _SAFE_DTYPES[d]


def validate(reader: SafetensorsReader, specs: list[TensorSpec], dtype: Any = None) -> None:
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


_FINITE_CHUNK = 1 << 22  # elements checked at a time (no temporary larger than one chunk)
# The exponent bits of the 16-bit floats: all set means infinite or NaN (a bit test is 10-50x faster than
# np.isfinite or a min/max on ml_dtypes' bfloat16 and on float16).
_EXPONENT = {np.dtype(np.float16): 0x7C00, np.dtype(jnp.bfloat16): 0x7F80}


def all_finite(array: np.ndarray) -> bool:
    """Whether every element of a float host array is finite, checked a chunk at a time (integers: True)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    mask = _EXPONENT.get(flat.dtype)
    if mask is not None:
        flat, mask = flat.view(np.uint16), np.uint16(mask)
        return not any(((flat[i:i + _FINITE_CHUNK] & mask) == mask).any()
                       for i in range(0, flat.size, _FINITE_CHUNK))
    if not np.issubdtype(flat.dtype, np.floating):
        return True
    return all(np.isfinite(flat[i:i + _FINITE_CHUNK]).all() for i in range(0, flat.size, _FINITE_CHUNK))


def nonfinite_error(array: np.ndarray, tensor: str, where: str, stored: np.ndarray | None = None,
                    extra: str = "") -> NonFiniteError:
    """The error for a tensor that is not all finite: how many NaN / infinite values and the first one's index
    (in `array`'s layout); `stored`: the tensor as stored, to tell an overflow of the cast from bad weights."""
    values = np.asarray(array, np.float32)
    bad = ~np.isfinite(values)
    first = np.unravel_index(int(np.argmax(bad)), values.shape) if values.ndim else ()
    count = f"{int(np.isnan(values).sum()):,} NaN and {int(np.isinf(values).sum()):,} infinite values"
    if stored is not None and all_finite(stored):
        why = (f"its values are finite as stored ({stored.dtype}) but overflow {array.dtype} on the cast: {count}; "
               f"load it in a wider dtype")
    else:
        why = f"{count} (first at index {tuple(int(i) for i in first)})"
    return NonFiniteError(f"{tensor} in {where}: {why}{extra}; NaN or infinite weights make every output "
                          "NaN. Pass check_finite=False to load it anyway")
