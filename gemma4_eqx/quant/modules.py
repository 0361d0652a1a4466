"""Quantized modules and whole-model transforms: `QuantLinear` (a final `AbstractLinear`), `QuantEmbedding`,
`quantize` / `dequantize_model`, and memory arithmetic (`weight_bytes`, `weight_memory`).

In the model a `QuantLinear` replaces a `layers.linear.Linear` at the same place in the tree (the decoder's
q/k/v/o and gate/up/down projections), and optionally a `QuantEmbedding` replaces the tied `embed_tokens` table (the
embedding lookup and the lm head). Layout, like `Linear`'s `[in, out]`:
    qweight  int8 / int4 [*stack, in, out]      (int4 is `jnp.int4`: XLA packs two codes per byte on CPU and GPU)
    scales   [*stack, in // group, out]          (int8: one group, `[*stack, 1, out]`)
The product dequantizes inside the jitted call (`q * scale`, rounded to the activation dtype) and multiplies in the
activation dtype through the layer's numerics policy. What XLA does with it (compiled HLO): on CPU the
convert-multiply is one loop fusion that writes a weight-sized buffer which the dot then reads (the CPU dot takes
no fused producer); on a GPU likewise, a `fused_convert` writes the bf16 weight before the GEMM. Decode-sized calls
off the CPU therefore take `QuantLinear.grouped_product` (scales applied after the product), which XLA:GPU turns
into reductions that read the int4/int8 codes directly (figures: `benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

from ..layers.linear import AbstractLinear, Linear
from ..layers.policy import XLA, Numerics
from ..utils.trees import replace_nodes
from .format import MODES, QuantConfig, QuantError, dequantize, num_groups, quantize_array

GROUPED_MAX_ROWS = 16  # QuantLinear calls of at most this many rows use `grouped_product` off the CPU


class QuantLinear(AbstractLinear):
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
        num_groups(linear.weight.shape[-2], qc.group_size, what)
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
        after the product, so no dequantized weight is formed. On a GPU XLA then reads the int4/int8 codes
        straight into the reduction (figures: `benchmarks/RESULTS.md`). Used for decode-sized calls (<= `GROUPED_MAX_ROWS` rows) under the default
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
        num_groups(table.shape[-1], qc.group_size, "embed_tokens")
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
