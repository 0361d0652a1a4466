"""The safetensors file format, read and written in bounded memory.

`safetensors.safe_open` memory-maps the whole file: every page a read touches stays in the process's resident
set until the file is closed, so loading a 24 GB checkpoint through it shows ~24 GB of file pages *on top of*
the model. Here the header is parsed directly and tensor bytes are read with `preadv` in chunks of at most
`CHUNK_BYTES`, straight into the destination buffer (or through one chunk-sized scratch buffer when the tensor
is cast, transposed or sliced). Writing is streamed the same way: the header is computed from shapes first, then
each tensor is written as it is produced.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces, then the
tensor bytes, contiguous, C order, little-endian; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from ..utils.files import open_regular

CHUNK_BYTES = 32 * 2**20  # scratch size when a tensor cannot be read straight into its destination
MAX_HEADER = 100 * 2**20  # safetensors' own limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Region = tuple[slice, ...]


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
    parts, done = [], 0
    while done < n:
        got = os.pread(fd, min(n - done, 1 << 26), offset + done)
        if not got:
            break
        parts.append(got)
        done += len(got)
    return b"".join(parts)


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 4096) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary.

    JAX's CPU backend adopts such a buffer without copying it (`jax.device_put` of a 64-byte aligned array is
    zero-copy), so a leaf assembled here is never duplicated on the way into the model.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _full_region(shape: tuple[int, ...]) -> Region:
    return tuple(slice(0, n) for n in shape)


def _normalise(region: Region | None, shape: tuple[int, ...]) -> Region:
    if region is None:
        return _full_region(shape)
    if len(region) != len(shape):
        raise ValueError(f"region {region} does not match a tensor of shape {shape}")
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"region {region}: only unit-step slices are supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class SafetensorsFile:
    """One `.safetensors` file: its header, and reads of whole tensors or of rectangular regions."""

    def __init__(self, path: str, file: BinaryIO | None = None) -> None:
        """`file`: the file already opened (e.g. by `utils.files.Folder.open`), kept and read from; else `path`
        is opened with `utils.files.open_regular` (a regular file only). Every read goes to this one descriptor,
        so the header and the tensor bytes always come from the same file, whatever happens to `path` meanwhile."""
        self.path = path
        self._file = open_regular(path, "a safetensors file") if file is None else file
        try:
            self._parse(*self._read_header())
        except BaseException:
            if file is None:
                self.close()
            raise

    def _read_header(self) -> tuple[Any, int]:
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        self.size = size
        head = _pread_exact(fd, 8, 0)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):  # the number itself is not shown: it may be any file's first bytes
            raise ValueError(f"the 8-byte header length exceeds the file size ({size} bytes) or the "
                             f"{MAX_HEADER}-byte limit: not a safetensors file, or a truncated one")
        try:
            header = json.loads(_pread_exact(fd, n, 8))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"header is not JSON ({str(e)[:200]})") from e
        return header, n

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def _parse(self, header: Any, n: int) -> None:
        size = self.size
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)) or end < begin:
                    raise ValueError("negative or non-integer sizes")
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{name}: malformed header entry {str(e)[:200]}") from err
            if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
                raise ValueError(f"{name}: {end - begin} bytes for a {dtype} tensor of shape {shape}")
            self.entries[name] = (dtype, shape, begin, end)
            spans.append((begin, end, name))
        offset = 0
        for begin, end, name in sorted(spans):
            if begin != offset:
                raise ValueError(f"{name}: data offsets [{begin}, {end}] leave a gap or overlap at byte {offset}")
            offset = end
        if offset != data_size:
            raise ValueError(f"the header describes {offset} bytes of tensor data but the file holds {data_size} "
                             "(truncated or padded)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_name(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def _np_dtype(self, name: str) -> np.dtype:
        d = self.entries[name][0]
        if d not in DTYPES:
            raise ValueError(f"{name}: dtype {d} is not supported")
        return DTYPES[d]

    def _pread(self, fd: int, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += got

    def read(self, name: str, region: Region | None = None) -> np.ndarray:
        """A new host array with the tensor (or its `region`), in the file's dtype."""
        shape = self.shape(name)
        region = _normalise(region, shape)
        out = aligned_empty(tuple(s.stop - s.start for s in region), self._np_dtype(name))
        self.read_into(name, out, region)
        return out

    def read_into(self, name: str, out: np.ndarray, region: Region | None = None, transpose: bool = False) -> None:
        """Write the tensor's `region` (on-disk coordinates) into `out`, cast to `out.dtype`, transposed if asked.

        Only rows (the first on-disk axis) inside the region are read from disk; a region that narrows a later
        axis reads whole rows a chunk at a time and keeps its columns. Host memory beyond `out` is one chunk.
        """
        dtype, shape = self._np_dtype(name), self.shape(name)
        region = _normalise(region, shape)
        want = tuple(s.stop - s.start for s in region)
        if transpose and len(shape) != 2:
            raise ValueError(f"{name}: only 2-D tensors can be transposed on read, found shape {shape}")
        if tuple(out.shape) != (want[::-1] if transpose else want):
            raise ValueError(f"{name}: destination shape {out.shape} does not match region {want}"
                             + (" (transposed)" if transpose else ""))
        base = self.data_start + self.entries[name][2]
        fd = self.fileno()
        if not shape:  # a scalar
            tmp = np.empty((), dtype)
            self._pread(fd, tmp, base)
            out[...] = tmp
            return
        row_elems = math.prod(shape[1:])
        row_bytes = row_elems * dtype.itemsize
        r0, r1 = region[0].start, region[0].stop
        inner = region[1:]
        whole_rows = inner == _full_region(shape[1:])
        if not transpose and whole_rows and out.dtype == dtype and out.flags.c_contiguous:
            self._pread(fd, out, base + r0 * row_bytes)  # straight into the destination
            return
        rows = max(1, min(r1 - r0, CHUNK_BYTES // max(row_bytes, 1)))
        scratch = np.empty(rows * row_elems, dtype)
        for a in range(r0, r1, rows):
            b = min(a + rows, r1)
            chunk = scratch[: (b - a) * row_elems]
            self._pread(fd, chunk, base + a * row_bytes)
            chunk = chunk.reshape((b - a,) + shape[1:])[(slice(None),) + inner]
            if chunk.dtype != out.dtype:  # cast the chunk first: a cast and a transpose together are slow
                chunk = chunk.astype(out.dtype)
            if transpose:
                out[:, a - r0:b - r0] = chunk.T
            else:
                out[a - r0:b - r0] = chunk


def write_file(path: str, layout: Iterable[tuple[str, str, tuple[int, ...]]],
               tensors: Iterator[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None,
               fsync: bool = True) -> int:
    """Write one safetensors file from a known `layout` (name, dtype name, shape), pulling each tensor in turn.

    `tensors` must yield the layout's names in order; each array is written and dropped before the next one is
    asked for. The bytes go to `path + ".partial"`, are fsynced (unless `fsync=False`) and renamed to `path` only
    when complete; on any error the partial file is removed. Returns the number of data bytes written.
    """
    layout = list(layout)
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in layout:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, dtype, shape in layout:
                got_name, t = next(tensors)
                if got_name != name or tuple(t.shape) != tuple(shape) or DTYPE_NAMES.get(t.dtype) != dtype:
                    raise AssertionError(f"{got_name} {t.shape} {t.dtype}: expected {name} {shape} {dtype}")
                f.write(memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8)))
                del t
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return offset
