"""Weight-only quantization: int8 per output channel, int4 with group-wise scales (docs: README "Quantized weights").

Formats (symmetric, no zero point):
- `int8`: one scale per output channel, `scale = max|w| / 127`, `q = round(w / scale)` in [-127, 127].
- `int4`: one scale per `group_size` consecutive input features of an output channel (default 32, the GGUF Q4_0
  block), `scale = max|w| / 7`, `q` in [-7, 7] from a quantization; a GGUF Q4_0 tensor (`gguf_io`) keeps its own
  codes in [-8, 7] and its fp16 scales, so the same layout holds it exactly.
`q` is computed from the scale as stored (after rounding to `scale_dtype`), so every dequantized element is within
half a quantization step (`scale / 2`) of the original, whatever the scale dtype.

In the model a `QuantLinear` replaces a `layers.linear.Linear` at the same place in the tree (the decoder's
q/k/v/o and gate/up/down projections), and optionally a `QuantEmbedding` replaces the tied `embed_tokens` table (the
embedding lookup and the lm head). Layout, like `Linear`'s `[in, out]`:
    qweight  int8 / int4 [*stack, in, out]      (int4 is `jnp.int4`: XLA packs two codes per byte on CPU and GPU)
    scales   [*stack, in // group, out]          (int8: one group, `[*stack, 1, out]`)
The product dequantizes inside the jitted call (`q * scale`, rounded to the activation dtype) and multiplies in the
activation dtype through the layer's numerics policy. What XLA does with it (compiled HLO): on CPU (jax 0.12) the
convert-multiply is one loop fusion that writes a weight-sized buffer which the dot then reads (the CPU dot takes
no fused producer); on an H200 (jax 0.11.2) likewise, a `fused_convert` writes the bf16 weight before the Triton
GEMM. Decode-sized calls off the CPU therefore take `QuantLinear.grouped_product` (scales applied after the
product), which XLA:GPU turns into reductions that read the int4/int8 codes directly.

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
import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Float, Int, Shaped

from ..layers.linear import Linear
from ..layers.policy import XLA, Numerics
from ..model.sharding import single_device

MODES = {"int8": 8, "int4": 4}
QUANT_METHOD = "gemma4_eqx"
DEFAULT_GROUP = {8: None, 4: 32}  # int8 is per output channel (one group spanning all inputs)
DEFAULT_SCALE_DTYPE = {8: "float32", 4: "float16"}
_QMAX = {8: 127, 4: 7}
_CODE_DTYPE = {8: jnp.int8, 4: jnp.int4}
GROUPED_MAX_ROWS = 16  # QuantLinear calls of at most this many rows use `grouped_product` off the CPU


class QuantError(ValueError):
    """A quantization request or a quantized tensor that does not fit the format."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What `quantize` does and what `config.json`'s `quantization_config` records."""

    bits: int  # 8 or 4
    group_size: int | None  # None: one group per output channel (int8)
    scale_dtype: str  # "float32", "float16" or "bfloat16"
    embedding: bool  # the tied embedding / lm head quantized too

    @classmethod
    def make(cls, mode: str, group_size: int | None = None, scale_dtype: Any = None,
             embedding: bool = False) -> QuantConfig:
        if mode not in MODES:
            raise QuantError(f"quantize: expected one of {sorted(MODES)}, found {mode!r}")
        bits = MODES[mode]
        group_size = DEFAULT_GROUP[bits] if group_size is None else group_size
        if bits == 8 and group_size is not None:
            raise QuantError(f"group_size: int8 is per output channel (group_size None), found {group_size}")
        if bits == 4 and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
            raise QuantError(f"group_size: expected an even positive int for int4, found {group_size!r}")
        name = DEFAULT_SCALE_DTYPE[bits] if scale_dtype is None else jnp.dtype(scale_dtype).name
        if name not in ("float32", "float16", "bfloat16"):
            raise QuantError(f"scale_dtype: expected float32, float16 or bfloat16, found {name}")
        return cls(bits, group_size, name, bool(embedding))

    @property
    def mode(self) -> str:
        return f"int{self.bits}"

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "mode": self.mode, "bits": self.bits, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "symmetric": True, "embedding": self.embedding,
                "modules": "decoder projections" + (" and the tied embedding" if self.embedding else "")}

    @classmethod
    def from_json(cls, d: Any, where: str = "quantization_config") -> QuantConfig:
        if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD:
            raise QuantError(f"{where}: expected an object with quant_method {QUANT_METHOD!r} (written by "
                             f"gemma4_eqx), found {d!r}")
        try:
            return cls.make(d["mode"], d["group_size"], d["scale_dtype"], d["embedding"])
        except KeyError as e:
            raise QuantError(f"{where}: the field {e.args[0]!r} is missing") from e


# ---- the arithmetic -------------------------------------------------------------------------------------------
def _groups(n_in: int, group_size: int | None, what: str) -> int:
    if group_size is None:
        return 1
    if n_in % group_size:
        raise QuantError(f"{what}: {n_in} input features do not split into groups of {group_size}; pass a "
                         f"group_size that divides it")
    return n_in // group_size


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def quantize_array(w: Float[Array, "*stack n_in n_out"], *, bits: int, group_size: int | None,
                   scale_dtype: str) -> tuple[Shaped[Array, "*stack n_in n_out"], Float[Array, "*stack groups n_out"]]:
    """`(q, scales)` of a weight laid out `[..., in, out]`, grouped along `in` (see the module docstring)."""
    *stack, n_in, n_out = w.shape
    g = _groups(n_in, group_size, "quantize")
    wg = w.astype(jnp.float32).reshape(*stack, g, n_in // g, n_out)
    qmax = _QMAX[bits]
    amax = jnp.max(jnp.abs(wg), axis=-2)
    scale = (amax / qmax).astype(scale_dtype)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))  # an all-zero group (or one that underflows)
    s32 = scale.astype(jnp.float32)
    q = jnp.clip(jnp.round(wg / s32[..., None, :]), -qmax - (bits == 4), qmax)
    return q.reshape(*stack, n_in, n_out).astype(_CODE_DTYPE[bits]), scale


def dequantize(q: Shaped[Array, "*stack n_in n_out"], scales: Float[Array, "*stack groups n_out"],
               dtype: Any = jnp.float32) -> Float[Array, "*stack n_in n_out"]:
    """`q * scale` in fp32, rounded once to `dtype` (exact in fp32: codes and scales are short)."""
    *stack, n_in, n_out = q.shape
    g = scales.shape[-2]
    w = q.astype(jnp.float32).reshape(*stack, g, n_in // g, n_out) * scales.astype(jnp.float32)[..., None, :]
    return w.reshape(q.shape).astype(dtype)


# ---- modules ----------------------------------------------------------------------------------------------------
class QuantLinear(eqx.Module):
    """A weight-only quantized `Linear` (no bias): `y = x @ dequantize(qweight, scales)` in x's dtype."""

    qweight: Shaped[Array, "in_features out_features"]
    scales: Float[Array, "groups out_features"]
    numerics: Numerics

    def __init__(self, qweight, scales, numerics: Numerics = XLA()):
        self.qweight, self.scales, self.numerics = qweight, scales, numerics

    @classmethod
    def from_linear(cls, linear: Linear, qc: QuantConfig, what: str = "Linear") -> QuantLinear:
        if linear.bias is not None:
            raise QuantError(f"{what}: has a bias; only bias-free projections are quantized")
        _groups(linear.weight.shape[-2], qc.group_size, what)
        q, s = quantize_array(linear.weight, bits=qc.bits, group_size=qc.group_size, scale_dtype=qc.scale_dtype)
        return cls(q, s, linear.numerics)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-1]

    @property
    def bits(self) -> int:
        return 4 if self.qweight.dtype == jnp.int4 else 8

    def dequantized(self, dtype: Any = jnp.float32) -> Float[Array, "*stack in_features out_features"]:
        return dequantize(self.qweight, self.scales, dtype)

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        rows = math.prod(x.shape[:-1])
        if rows <= GROUPED_MAX_ROWS and isinstance(self.numerics, XLA) and jax.default_backend() != "cpu":
            return self.grouped_product(x)
        return self.numerics.matmul(x, dequantize(self.qweight, self.scales, x.dtype))

    def grouped_product(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """`sum_g (x_g @ q_g) * s_g` in fp32: the codes multiply as they are (exact in bf16) and the scales come
        after the product, so no dequantized weight is formed. On an H200 XLA then reads the int4/int8 codes
        straight into the reduction (12B decode at batch 1: int4 42.2 -> 32.0 ms/token, int8 32.3 -> 28.1;
        `benchmarks/RESULTS.md`). Used for decode-sized calls (<= `GROUPED_MAX_ROWS` rows) under the default
        numerics off the CPU (XLA:CPU has no bf16 x bf16 -> fp32 batched dot); it rounds once at the end rather
        than after dequantizing, so its outputs differ from the dequantize-then-matmul path by rounding only."""
        q, s = self.qweight, self.scales
        n_in, n_out = q.shape
        g = s.shape[0]
        xg = x.reshape(*x.shape[:-1], g, n_in // g)
        y = jnp.einsum("...gk,gko->...go", xg, q.reshape(g, n_in // g, n_out).astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return jnp.sum(y * s.astype(jnp.float32), axis=-2).astype(x.dtype)


class QuantEmbedding(eqx.Module):
    """The tied embedding table quantized per vocabulary row (groups along `hidden`), standing where the model
    keeps its `[vocab, hidden]` array: `table[ids]` gives dequantized rows and `table.astype(dtype)` the whole
    table (the lm head's operand), both in `dtype`, the model's float dtype (`model.dtype`)."""

    qweight: Shaped[Array, "vocab hidden"]
    scales: Float[Array, "vocab groups"]
    float_dtype: Any = eqx.field(static=True)

    def __init__(self, qweight, scales, float_dtype):
        self.qweight, self.scales, self.float_dtype = qweight, scales, jnp.dtype(float_dtype)

    @classmethod
    def from_table(cls, table: Array, qc: QuantConfig) -> QuantEmbedding:
        _groups(table.shape[-1], qc.group_size, "embed_tokens")
        q, s = quantize_array(table.T, bits=qc.bits, group_size=qc.group_size, scale_dtype=qc.scale_dtype)
        return cls(q.T, s.T, table.dtype)

    @property
    def dtype(self):
        return self.float_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    def __getitem__(self, ids) -> Array:
        rows, scales = self.qweight[ids], self.scales[ids]
        return dequantize(jnp.swapaxes(rows, -1, -2), jnp.swapaxes(scales, -1, -2), self.float_dtype).swapaxes(-1, -2)

    def astype(self, dtype) -> Float[Array, "vocab hidden"]:
        return dequantize(self.qweight.T, self.scales.T, dtype).T


# ---- whole models -------------------------------------------------------------------------------------------------
def _is_linear(x) -> bool:
    return isinstance(x, Linear)


def decoder_linears(model) -> list[Linear]:
    """The `Linear` projections of the decoder stack (stacked `[repeats, run_length, in, out]`)."""
    return [x for x in jax.tree.leaves(model.layers, is_leaf=_is_linear) if isinstance(x, Linear)]


def follow(tree, path) -> Any:
    """The node at a `jax.tree_util` key path."""
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            tree = getattr(tree, k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            tree = tree[k.idx]
        elif isinstance(k, jax.tree_util.DictKey):
            tree = tree[k.key]
        else:
            raise TypeError(f"unsupported key {k!r}")
    return tree


def paths_of(tree, predicate) -> list[tuple]:
    """Key paths of the nodes of `tree` that satisfy `predicate` (not descended into)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=predicate)
    return [path for path, x in flat if predicate(x)]


def replace_nodes(tree, predicate, fn):
    """`tree` with every node satisfying `predicate` replaced by `fn(node)` (one `eqx.tree_at`)."""
    paths = paths_of(tree, predicate)
    if not paths:
        return tree
    new = [fn(follow(tree, p)) for p in paths]
    return eqx.tree_at(lambda t: [follow(t, p) for p in paths], tree, replace=new, is_leaf=predicate)


def quantize(model, mode: str = "int8", *, group_size: int | None = None, embedding: bool = False,
             scale_dtype: Any = None):
    """The same model with every decoder projection a `QuantLinear` (and, with `embedding=True`, the tied
    embedding a `QuantEmbedding`); other arrays are shared, not copied. `mode`: "int8" (per output channel) or
    "int4" (groups of `group_size`, default 32, along the input features). Vision and audio embedders stay in
    their float dtype."""
    qc = QuantConfig.make(mode, group_size, scale_dtype, embedding)
    if is_quantized(model):
        raise QuantError("quantize: the model is already quantized")
    if not decoder_linears(model):
        raise QuantError("quantize: the model's decoder holds no Linear projection to quantize")
    layers = replace_nodes(model.layers, _is_linear,
                           lambda x: QuantLinear.from_linear(x, qc, f"decoder projection {x.weight.shape}"))
    model = eqx.tree_at(lambda m: m.layers, model, replace=layers)
    if qc.embedding:
        model = eqx.tree_at(lambda m: m.embed_tokens, model, replace=QuantEmbedding.from_table(model.embed_tokens, qc))
    return model


quantize_model = quantize  # (`load_folder` takes a `quantize=` keyword)


def is_quantized(model) -> bool:
    return any(isinstance(x, (QuantLinear, QuantEmbedding))
               for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, (QuantLinear, QuantEmbedding))))


def quant_config_of(model) -> QuantConfig | None:
    """The `QuantConfig` a quantized model was made with (read from its arrays), None for a float model."""
    qls = [x for x in jax.tree.leaves(model.layers, is_leaf=lambda x: isinstance(x, QuantLinear))
           if isinstance(x, QuantLinear)]
    if not qls:
        return None
    first = qls[0]
    bits = first.bits
    group = None if bits == 8 else first.in_features // first.scales.shape[-2]
    return QuantConfig(bits, group, jnp.dtype(first.scales.dtype).name, isinstance(model.embed_tokens, QuantEmbedding))


def dequantize_model(model, dtype: Any = None):
    """A float model back from a quantized one (every `QuantLinear` a `Linear` holding `dequantize(...)`)."""
    dtype = model.dtype if dtype is None else dtype
    is_q = lambda x: isinstance(x, (QuantLinear, QuantEmbedding))

    def back(x):
        if isinstance(x, QuantEmbedding):
            return x.astype(dtype)
        n_in, n_out = x.qweight.shape[-2:]
        lin = eqx.filter_eval_shape(lambda: Linear(n_in, n_out, key=jax.random.key(0), numerics=x.numerics))
        return eqx.tree_at(lambda l: (l.weight, l.bias), lin, replace=(x.dequantized(dtype), None),
                           is_leaf=lambda v: v is None)

    return replace_nodes(model, is_q, back)


def weight_bytes(model) -> int:
    """Bytes of the model's arrays as stored on the device (int4 codes at half a byte)."""
    total = 0
    for x in jax.tree.leaves(model):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            n = int(np.prod(x.shape))
            total += n // 2 if jnp.dtype(x.dtype) == jnp.int4 else n * jnp.dtype(x.dtype).itemsize
    return total


# ---- host-side packing for safetensors ----------------------------------------------------------------------------
def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], `[..., n]` (n even) -> uint8 `[..., n // 2]`, element 2j in the low nibble."""
    c = np.asarray(codes).astype(np.int8)
    if c.shape[-1] % 2:
        raise QuantError(f"int4 codes: the last axis ({c.shape[-1]}) must be even to pack two codes per byte")
    u = (c & 0x0F).astype(np.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 `[..., n // 2]` -> int8 codes `[..., n]` in [-8, 7] (the inverse of `pack_int4`)."""
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.int8)
    lo, hi = (p & 0x0F).astype(np.int8), (p >> 4).astype(np.int8)
    out[..., 0::2] = np.where(lo > 7, lo - 16, lo)
    out[..., 1::2] = np.where(hi > 7, hi - 16, hi)
    return out


def codes_to_host(q: Array) -> np.ndarray:
    """Device codes (int8 or int4) as an int8 host array."""
    return np.asarray(jax.device_get(q)).astype(np.int8)


def int4_host(codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.int8).astype(ml_dtypes.int4)


# ---- safetensors layout (save and load) ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    """One on-disk tensor of a quantized checkpoint and the leaf (key path in the quantized model) it fills."""

    name: str  # on-disk name
    source: Any  # the float model's TensorSpec it comes from
    target: tuple  # key path of the quantized model's leaf
    part: str  # "float", "qweight" or "scales"
    module: str  # "linear" (stored [out, in] on disk) or "embedding" ([vocab, hidden], untransposed) or ""


def _leaf_paths(tree) -> dict[int, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {id(x): path for path, x in flat}


def _entries(qabstract, fabstract, specs) -> list[_Entry]:
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
                out.append(_Entry(f"{stem}.{part}", s, base + (jax.tree_util.GetAttrKey(part),), part, module))
        else:
            out.append(_Entry(s.name, s, path, "float", ""))
    return out


def _disk_layout(e: _Entry, leaf) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype name, on-disk shape) of an entry whose model leaf is `leaf`."""
    from ..io.safetensors import DTYPE_NAMES

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


def _to_disk(e: _Entry, piece: Array) -> np.ndarray:
    """One layer's piece of a leaf (model layout) as its on-disk array."""
    if e.part == "float":
        t = np.asarray(jax.device_get(piece))
        return np.ascontiguousarray(t.T if e.source.transpose else t)
    int4 = e.part == "qweight" and jnp.dtype(piece.dtype) == jnp.int4
    t = codes_to_host(piece) if e.part == "qweight" else np.asarray(jax.device_get(piece))
    if e.module == "linear":
        t = t.T
    return np.ascontiguousarray(pack_int4(t) if int4 else t)


def _from_disk(e: _Entry, t: np.ndarray, leaf) -> np.ndarray:
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


def plan_shards(model, max_shard_size) -> list[list[tuple[_Entry, str, tuple[int, ...]]]]:
    """The tensors of each file of a quantized model's checkpoint: (entry, dtype name, on-disk shape)."""
    from ..io.names import tensor_specs
    from ..io.save import _parse_size
    from ..io.safetensors import DTYPES

    limit = _parse_size(max_shard_size)
    fabstract = float_skeleton(model)
    shards: list[list] = [[]]
    size = 0
    for e in _entries(model, fabstract, tensor_specs(fabstract)):
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
    import os

    from ..io.names import SAFE_INDEX, SAFE_SINGLE
    from ..io.save import _done, _take_layer, write_json
    from ..io.safetensors import write_file

    shards = plan_shards(model, max_shard_size)
    files = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def tensors(shard):
        for e, _, _ in shard:
            leaf = follow(model, e.target)
            idx = e.source.index
            piece = leaf if not idx else _take_layer(leaf, np.asarray(idx, np.int32))
            yield e.name, _to_disk(e, piece)

    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        layout = [(e.name, d, shape) for e, d, shape in shard]
        total += write_file(os.path.join(folder, file), layout, tensors(shard), {"format": "pt"}, fsync=True)
        _done(f"write {file}")
        weight_map.update({e.name: file for e, _, _ in shard})
    if len(shards) > 1:
        write_json(os.path.join(folder, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def saved_quant_config(folder: str) -> QuantConfig | None:
    """The `quantization_config` of a folder's config.json (None when it has none)."""
    import os

    from ..config.gemma4 import ConfigError
    from ..config.fields import read_json_file

    path = os.path.join(folder, "config.json")
    d = read_json_file(path, ConfigError)  # a broken config.json is a config error, as the config reader says
    if not isinstance(d, dict) or d.get("quantization_config") is None:
        return None  # anything else wrong with it is for the config reader to name
    try:
        return QuantConfig.from_json(d["quantization_config"], f"{path}: quantization_config")
    except QuantError as e:
        raise ConfigError(str(e)) from e


def as_quant_config(quantize: Any) -> QuantConfig | None:
    """`load(quantize=...)`: None, "int8", "int4", a `QuantConfig` or a dict of `QuantConfig.make`'s keywords."""
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantConfig.make(quantize)
    if isinstance(quantize, dict):
        return QuantConfig.make(**quantize)
    raise QuantError(f"quantize: expected 'int8', 'int4', a QuantConfig or a dict, found {type(quantize).__name__}")


def _stack_writer():
    from ..io.load import _layer_writer

    return _layer_writer(single_device())


def load_folder(folder: str, *, dtype: Any = None, quantize: Any = None, model_kwargs: dict | None = None,
                progress: Any = None):
    """A quantized model from `folder`: a saved quantized checkpoint (its `quantization_config`), or a float one
    quantized tensor by tensor as it is read (`quantize`). Host memory stays near the quantized model plus one
    float tensor (and its fp32 copy while it is quantized); every stacked leaf is allocated on the device once and
    filled one layer at a time."""
    from ..io.load import SafetensorsReader, _assemble, _progress_callback, checkpoint_dtype, float_dtype, validate
    from ..io.names import CheckpointError, TensorSpec, tensor_specs
    from ..config.gemma4 import Gemma4Config
    from ..model.gemma4 import Gemma4

    dtype = float_dtype(dtype)
    want = as_quant_config(quantize)
    saved = saved_quant_config(folder)
    if saved is not None and want is not None and want != saved:
        raise QuantError(f"quantize: {folder} is already quantized as {saved.to_json()}; it cannot be "
                         f"re-quantized as {want.to_json()} (omit quantize= to load it as it is)")
    qc = saved or want
    config = Gemma4Config.from_pretrained(folder)
    reader = SafetensorsReader(folder)
    kwargs = model_kwargs or {}
    probe = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), **kwargs))
    specs = tensor_specs(probe)
    if saved is None:
        validate(reader, specs, dtype)
        if dtype is None:
            dtype = checkpoint_dtype(reader, specs)
    elif dtype is None:
        from ..config.fields import read_json_file
        import os

        name = read_json_file(os.path.join(folder, "config.json"), CheckpointError).get("dtype", "float32")
        dtype = float_dtype(name)
    fabstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **kwargs))
    specs = tensor_specs(fabstract)
    qabstract = eqx.filter_eval_shape(lambda m: quantize_model(m, qc.mode, group_size=qc.group_size,
                                                         embedding=qc.embedding, scale_dtype=qc.scale_dtype),
                                      fabstract)
    entries = _entries(qabstract, fabstract, specs)
    if saved is not None:
        expected = {e.name for e in entries}
        found = reader.names()
        for what, names in (("missing from the checkpoint", expected - found),
                            ("unexpected tensor; the quantized model has no such parameter", found - expected)):
            if names:
                first = sorted(names)[0]
                raise CheckpointError(f"{first}: {what}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
        for e in entries:
            want_dtype, want_shape = _disk_layout(e, follow(qabstract, e.target))
            shape, d = reader.info(e.name)
            if (tuple(shape), d) != (tuple(want_shape), want_dtype):
                raise CheckpointError(f"{e.name}: expected {want_dtype} {tuple(want_shape)}, found {d} {tuple(shape)}")
        names = [e.name for e in entries]
    else:
        names = [s.name for s in specs]
    update, close = _progress_callback(progress, reader, [TensorSpec(n, lambda m: None, (), False, ()) for n in names])
    write = _stack_writer()
    values: dict[tuple, Any] = {}

    def put(target: tuple, index: tuple, piece) -> None:
        leaf = follow(qabstract, target)
        if not index:
            values[target] = jax.device_put(piece)
            return
        if target not in values:
            values[target] = jnp.zeros(leaf.shape, leaf.dtype)
        values[target] = write(values[target], jnp.asarray(piece), jnp.asarray(index, jnp.int32))

    try:
        done = set()
        for e in entries:
            s = e.source
            n_stack = len(s.index)
            if saved is not None or e.part == "float":
                leaf = follow(qabstract, e.target)
                if e.part == "float":
                    piece = _assemble(reader, [dataclasses.replace(s, index=())], tuple(leaf.shape[n_stack:]),
                                      np.dtype(leaf.dtype))
                else:
                    piece = _from_disk(e, reader.read(e.name), leaf)
                put(e.target, s.index, piece)
                if update is not None:
                    update(reader.nbytes(e.name), 1)
                continue
            if s.name in done:  # the scales of a tensor quantized on the fly come with its codes
                continue
            done.add(s.name)
            fleaf = s.leaf(fabstract)
            w = jnp.asarray(_assemble(reader, [dataclasses.replace(s, index=())], tuple(fleaf.shape[n_stack:]),
                                      np.dtype(fleaf.dtype)))
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
    targets = list(values)
    return eqx.tree_at(lambda m: [follow(m, t) for t in targets], qabstract,
                       replace=[jax.block_until_ready(values[t]) for t in targets])


def sharding_rules(rules):
    """Partition rules (`g4.sharding`) extended to a quantized model's leaves: a rule for `<x>.weight` also gives
    `<x>.qweight` and `<x>.scales` its spec (scales are `[groups, out]`: an axis that does not divide is replicated),
    and `^embed_tokens$` covers the quantized table's `embed_tokens.qweight` / `.scales`."""
    out = []
    for pattern, spec in rules:
        if pattern.endswith(r"\.weight$"):
            out.append((pattern[:-len(r"\.weight$")] + r"\.(qweight|scales)$", spec))
        elif pattern == r"^embed_tokens$":
            out.append((r"^embed_tokens\.(qweight|scales)$", spec))
        out.append((pattern, spec))
    return tuple(out)


def weight_memory(abstract, dtype: Any = None) -> dict[str, int]:
    """Bytes of a float model's weights as stored (from shapes alone: `abstract` may come from
    `eqx.filter_eval_shape`) in its dtype and quantized: `{"float": ..., "int8": ..., "int8+embedding": ...,
    "int4": ..., "int4+embedding": ...}` (default group sizes and scale dtypes; vision and audio stay float)."""
    out = {"float": weight_bytes(abstract)}
    for mode in MODES:
        for emb in (False, True):
            q = eqx.filter_eval_shape(lambda m: quantize(m, mode, embedding=emb), abstract)
            out[mode + ("+embedding" if emb else "")] = weight_bytes(q)
    return out
