"""Quantized checkpoints: the safetensors layout of a quantized model, its writer, and its loader (a saved
quantized folder, or a float folder quantized tensor by tensor as it streams in).

On disk (safetensors, transformers' names with the module's `.weight` replaced):
    <module>.qweight   I8 [out, in] (int8), or U8 [out, in // 2] (int4: two codes per byte, the even input
                       column in the low nibble, two's complement nibbles)
    <module>.scales    [out, in // group] in `scale_dtype` (int8: [out, 1])
    embed_tokens: `...embed_tokens.qweight` [vocab, hidden] (int4 packed [vocab, hidden // 2]) and
                  `...embed_tokens.scales` [vocab, hidden // group] when the embedding is quantized
and `config.json` carries `quantization_config` (`QuantConfig.to_json`). `g4.load` reads such a folder back;
`g4.load(..., quantize="int8" | "int4")` quantizes a float checkpoint one tensor at a time as it streams in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array

from ..config import ConfigError
from ..config.fields import read_config_file
from ..model.gemma4 import Gemma4
from ..model.sharding import single_device
from ..quant import modules as quant_modules
from ..quant.format import (
    QMAX,
    QuantConfig,
    QuantError,
    as_quant_config,
    codes_to_host,
    pack_int4,
    quantize_array,
    unpack_int4,
)
from ..quant.modules import QuantEmbedding, QuantLinear, dequantize_model
from ..utils.trees import follow
from .load import OpenedFolder, assemble, layer_writer, open_checkpoint, open_folder, progress_callback
from .names import SAFE_INDEX, SAFE_SINGLE, CheckpointError, TensorSpec, tensor_specs
from .reader import float_dtype
from .safetensors import DTYPE_NAMES, DTYPES, write_file
from .save import mark_done, parse_size, take_layer, write_json


@dataclasses.dataclass(frozen=True)
class Entry:
    """One on-disk tensor of a quantized checkpoint and the leaf (key path in the quantized model) it fills."""

    name: str  # on-disk name
    source: Any  # the float model's TensorSpec it comes from
    target: tuple  # key path of the quantized model's leaf
    part: str  # "float", "qweight" or "scales"
    module: str  # "linear" (stored [out, in] on disk) or "embedding" ([vocab, hidden], untransposed) or ""


def _leaf_paths(tree) -> dict[int, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {id(x): path for path, x in flat}


def entries(qabstract, fabstract, specs) -> list[Entry]:
    """The quantized checkpoint's tensors, in the float checkpoint's order (each quantized one as two)."""
    paths = _leaf_paths(fabstract)
    out = []
    for s in specs:
        path = paths[id(s.leaf(fabstract))]
        parent = follow(qabstract, path[:-1]) if path[-1] == jax.tree_util.GetAttrKey("weight") else None
        node = None if isinstance(parent, QuantLinear) else follow(qabstract, path)
        if isinstance(parent, QuantLinear) or isinstance(node, QuantEmbedding):
            module = "linear" if isinstance(parent, QuantLinear) else "embedding"
            base = path[:-1] if module == "linear" else path
            stem = s.name[:-len(".weight")] if s.name.endswith(".weight") else s.name
            for part in ("qweight", "scales"):
                out.append(Entry(f"{stem}.{part}", s, base + (jax.tree_util.GetAttrKey(part),), part, module))
        else:
            out.append(Entry(s.name, s, path, "float", ""))
    return out


def _disk_layout(e: Entry, leaf) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype name, on-disk shape) of an entry whose model leaf is `leaf`."""

    n_stack = len(e.source.index)
    shape = tuple(leaf.shape[n_stack:])
    if e.part == "float":
        return DTYPE_NAMES[np.dtype(leaf.dtype)], e.source.shape
    if e.module == "linear":
        shape = shape[::-1]  # [in, out] -> [out, in]; scales [groups, out] -> [out, groups]
    if e.part == "qweight":
        if jnp.dtype(leaf.dtype) == jnp.int4:
            return "U8", shape[:-1] + (shape[-1] // 2,)
        return "I8", shape
    return DTYPE_NAMES[np.dtype(leaf.dtype)], shape


def _to_disk(e: Entry, piece: Array) -> np.ndarray:
    """One layer's piece of a leaf (model layout) as its on-disk array."""
    if e.part == "float":
        t = np.asarray(jax.device_get(piece))
        return np.ascontiguousarray(t.T if e.source.transpose else t)
    int4 = e.part == "qweight" and jnp.dtype(piece.dtype) == jnp.int4
    t = codes_to_host(piece) if e.part == "qweight" else np.asarray(jax.device_get(piece))
    if e.module == "linear":
        t = t.T
    return np.ascontiguousarray(pack_int4(t) if int4 else t)


def _from_disk(e: Entry, t: np.ndarray, leaf) -> np.ndarray:
    """An on-disk array as one layer's piece of the model leaf `leaf` (the inverse of `_to_disk`)."""
    if e.part == "qweight":
        int4 = jnp.dtype(leaf.dtype) == jnp.int4
        codes = unpack_int4(t) if int4 else t
        if e.module == "linear":
            codes = codes.T
        return np.ascontiguousarray(codes).astype(ml_dtypes.int4 if int4 else np.int8)
    return np.ascontiguousarray(t.T if e.module == "linear" else t).astype(leaf.dtype)


def float_skeleton(model):
    """The float model's abstract twin of a quantized one (what transformers' names are listed from)."""
    return eqx.filter_eval_shape(dequantize_model, model)


def plan_shards(model, max_shard_size) -> list[list[tuple[Entry, str, tuple[int, ...]]]]:
    """The tensors of each file of a quantized model's checkpoint: (entry, dtype name, on-disk shape)."""

    limit = parse_size(max_shard_size)
    fabstract = float_skeleton(model)
    shards: list[list] = [[]]
    size = 0
    for e in entries(model, fabstract, tensor_specs(fabstract)):
        dtype, shape = _disk_layout(e, follow(model, e.target))
        nbytes = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if size and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((e, dtype, shape))
        size += nbytes
    return shards


def write_safetensors(model, folder: str, max_shard_size="5GB") -> list[str]:
    """`checkpoint_save.write_safetensors` for a quantized model: the layout of the module docstring, one tensor
    (one layer's piece) fetched and written at a time."""

    shards = plan_shards(model, max_shard_size)
    files = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def tensors(shard):
        for e, _, _ in shard:
            leaf = follow(model, e.target)
            idx = e.source.index
            piece = leaf if not idx else take_layer(leaf, np.asarray(idx, np.int32))
            yield e.name, _to_disk(e, piece)

    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        layout = [(e.name, d, shape) for e, d, shape in shard]
        total += write_file(os.path.join(folder, file), layout, tensors(shard), {"format": "pt"}, fsync=True)
        mark_done(f"write {file}")
        weight_map.update({e.name: file for e, _, _ in shard})
    if len(shards) > 1:
        write_json(os.path.join(folder, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def quant_config_from(raw: Any, path: str) -> QuantConfig | None:
    """The `quantization_config` of config.json's JSON value `raw` read from `path` (None when it has none);
    `ConfigError` naming the file when it is not one gemma4_eqx wrote or its fields disagree."""
    if not isinstance(raw, dict) or raw.get("quantization_config") is None:
        return None  # anything else wrong with it is for the config reader to name
    try:
        return QuantConfig.from_json(raw["quantization_config"], f"{path}: quantization_config")
    except QuantError as e:
        raise ConfigError(str(e)) from e


def saved_quant_config(folder: str) -> QuantConfig | None:
    """The `quantization_config` of a folder's config.json (None when it has none), read as every config.json is
    (`config.fields.read_config_file`: a regular file of at most 8 MiB; a FIFO or device is refused, not read)."""
    raw, path = read_config_file(folder, ConfigError)  # a broken config.json is a config error
    return quant_config_from(raw, path)


def _check_codes(e: Entry, t: np.ndarray, where: str, qc: QuantConfig) -> None:
    """Saved int8 codes lie in [-127, 127] (what `quantize_array` writes; int4 nibbles cannot leave [-8, 7])."""
    if e.part == "qweight" and qc.bits == 8 and t.size and int(t.min()) < -QMAX[8]:
        first = np.unravel_index(int(np.argmin(t)), t.shape)
        raise CheckpointError(f"{e.name} in {where}: int8 code {int(t.min())} at index {tuple(map(int, first))} is "
                              f"outside [-{QMAX[8]}, {QMAX[8]}], the range int8 quantization writes")


def _check_scales(e: Entry, t: np.ndarray, where: str, qc: QuantConfig) -> None:
    """Saved scales are finite; int8 ones also > 0 (`quantize_array` writes only those). int4 scales may be zero
    or negative: a GGUF Q4_0 block's scale is `-max / 8` of its signed extreme (0 for an all-zero block), and a
    model read from GGUF saves its blocks as they are."""
    if e.part != "scales" or not t.size:
        return
    values = t.astype(np.float32)
    ok = np.isfinite(values) & (values > 0) if qc.bits == 8 else np.isfinite(values)
    if not ok.all():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmin(ok)), t.shape))
        what = "finite numbers > 0" if qc.bits == 8 else "finite numbers"
        raise CheckpointError(f"{e.name} in {where}: {int((~ok).sum()):,} scales are not {what} (first "
                              f"{float(values[first])!r} at index {first}); NaN or infinite scales make every output "
                              "NaN")


class LeafFiller:
    """Builds an abstract model's leaves on the default device from host pieces: an unstacked leaf in one piece, a
    stacked decoder leaf allocated once and written one layer's piece at a time (in place, the stack donated).
    Shared by the quantized loader and the GGUF reader."""

    def __init__(self, abstract: Any):
        self.abstract = abstract
        self.values: dict[tuple, Any] = {}
        self._write = layer_writer(single_device())

    def put(self, target: tuple, index: tuple, piece) -> None:
        """`piece` into the leaf at key path `target`, at the stacked `index` (`()` for a whole leaf)."""
        if not index:
            self.values[target] = jax.device_put(piece)
            return
        if target not in self.values:
            leaf = follow(self.abstract, target)
            self.values[target] = jnp.zeros(leaf.shape, leaf.dtype)
        self.values[target] = self._write(self.values[target], jnp.asarray(piece), jnp.asarray(index, jnp.int32))

    def model(self) -> Any:
        """The abstract model with every leaf that was put filled in."""
        targets = list(self.values)
        return eqx.tree_at(lambda m: [follow(m, t) for t in targets], self.abstract,
                           replace=[jax.block_until_ready(self.values[t]) for t in targets])


def load_quantized_folder(folder: str, *, dtype: Any = None, quantize: Any = None, model_kwargs: dict | None = None,
                          progress: Any = None, check_finite: bool = True, opened: OpenedFolder | None = None):
    """A quantized model from `folder`: a saved quantized checkpoint (its `quantization_config`), or a float one
    quantized tensor by tensor as it is read (`quantize`). Host memory stays near the quantized model plus one
    float tensor (and its fp32 copy while it is quantized); every stacked leaf is allocated on the device once and
    filled one layer at a time. Every tensor is checked as it is read: float ones finite (`check_finite`), codes
    in range, scales finite and > 0. `opened`: the folder already opened by `load.open_folder` (closed here)."""
    opened = open_folder(folder) if opened is None else opened
    try:
        return _load_quantized(opened, dtype, quantize, model_kwargs, progress, check_finite)
    finally:
        opened.close()


def _load_quantized(opened: OpenedFolder, dtype: Any, quantize: Any, model_kwargs: dict | None, progress: Any,
                    check_finite: bool):
    folder, reader, config = opened.folder, opened.reader, opened.config
    want = as_quant_config(quantize)
    saved = quant_config_from(opened.raw_config, opened.config_path)
    if saved is not None and want is not None and want != saved:
        raise QuantError(f"quantize: {folder} is already quantized as {saved.to_json()}; it cannot be "
                         f"re-quantized as {want.to_json()} (omit quantize= to load it as it is)")
    qc = saved or want
    kwargs = model_kwargs or {}
    build = lambda dt: Gemma4(config, key=jax.random.key(0), dtype=dt, **kwargs)
    if saved is None:  # a float checkpoint: checked like any other before it is quantized
        reader, fabstract, dtype = open_checkpoint(folder, build, dtype, reader=reader)
    else:  # its tensors are checked against the quantized layout below
        dtype = float_dtype(dtype)
        if dtype is None:
            name = opened.raw_config.get("dtype", "float32")
            try:
                dtype = float_dtype(name)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{opened.config_path}: dtype: {e}") from None
        fabstract = eqx.filter_eval_shape(lambda: build(dtype))
    specs = tensor_specs(fabstract)
    qabstract = eqx.filter_eval_shape(lambda m: quant_modules.quantize(
        m, qc.mode, group_size=qc.group_size, embedding=qc.embedding, scale_dtype=qc.scale_dtype), fabstract)
    plan = entries(qabstract, fabstract, specs)
    if saved is not None:
        expected = {e.name for e in plan}
        found = reader.names()
        for what, names in (("missing from the checkpoint", expected - found),
                            ("unexpected tensor; the quantized model has no such parameter", found - expected)):
            if names:
                first = sorted(names)[0]
                raise CheckpointError(f"{first}: {what}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
        for e in plan:
            want_dtype, want_shape = _disk_layout(e, follow(qabstract, e.target))
            shape, d = reader.info(e.name)
            if (tuple(shape), d) != (tuple(want_shape), want_dtype):
                raise CheckpointError(f"{e.name}: expected {want_dtype} {tuple(want_shape)}, found {d} {tuple(shape)}")
        names = [e.name for e in plan]
    else:
        names = [s.name for s in specs]
    update, close = progress_callback(progress, reader, [TensorSpec(n, lambda m: None, (), False, ()) for n in names])
    filler = LeafFiller(qabstract)
    put = filler.put
    try:
        done = set()
        for e in plan:
            s = e.source
            n_stack = len(s.index)
            if saved is not None or e.part == "float":
                leaf = follow(qabstract, e.target)
                if e.part == "float":
                    piece = assemble(reader, [dataclasses.replace(s, index=())], tuple(leaf.shape[n_stack:]),
                                     np.dtype(leaf.dtype), check_finite=check_finite)
                else:
                    t = reader.read(e.name)
                    _check_codes(e, t, reader.path(e.name), qc)
                    if check_finite:
                        _check_scales(e, t, reader.path(e.name), qc)
                    piece = _from_disk(e, t, leaf)
                    del t
                put(e.target, s.index, piece)
                if update is not None:
                    update(reader.nbytes(e.name), 1)
                continue
            if s.name in done:  # the scales of a tensor quantized on the fly come with its codes
                continue
            done.add(s.name)
            fleaf = s.leaf(fabstract)
            w = jnp.asarray(assemble(reader, [dataclasses.replace(s, index=())], tuple(fleaf.shape[n_stack:]),
                                     np.dtype(fleaf.dtype), check_finite=check_finite))
            if e.module == "linear":
                q, sc = quantize_array(w, bits=qc.bits, group_size=qc.group_size, scale_dtype=qc.scale_dtype)
            else:
                q, sc = quantize_array(w.T, bits=qc.bits, group_size=qc.group_size, scale_dtype=qc.scale_dtype)
                q, sc = q.T, sc.T
            del w
            put(e.target, s.index, q)
            put(e.target[:-1] + (jax.tree_util.GetAttrKey("scales"),), s.index, sc)
            if update is not None:
                update(reader.nbytes(s.name), 1)
    finally:
        close()
    return filler.model()
