"""The quantized weight format: `QuantConfig` (what `config.json`'s `quantization_config` records), the symmetric
absmax arithmetic (`quantize_array`, `dequantize`) and the host-side packing of int4 codes (two per byte).

Formats (symmetric, no zero point):
- `int8`: one scale per output channel, `scale = max|w| / 127`, `q = round(w / scale)` in [-127, 127].
- `int4`: one scale per `group_size` consecutive input features of an output channel (default 32, the GGUF Q4_0
  block), `scale = max|w| / 7`, `q` in [-7, 7] from a quantization; a GGUF Q4_0 tensor (`io.gguf`) keeps its own
  codes in [-8, 7] and its fp16 scales, so the same layout holds it exactly.
`q` is computed from the scale as stored (after rounding to `scale_dtype`), so every dequantized element is within
half a quantization step (`scale / 2`) of the original, whatever the scale dtype. The on-disk layout is
`io.quantized`'s docstring.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Float, Shaped

MODES = {"int8": 8, "int4": 4}
QUANT_METHOD = "gemma4_eqx"
DEFAULT_GROUP = {8: None, 4: 32}  # int8 is per output channel (one group spanning all inputs)
DEFAULT_SCALE_DTYPE = {8: "float32", 4: "float16"}
QMAX = {8: 127, 4: 7}
CODE_DTYPE = {8: jnp.int8, 4: jnp.int4}


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
        if not isinstance(mode, str) or mode not in MODES:
            raise QuantError(f"quantize: expected one of {sorted(MODES)}, found {mode!r}")
        if not isinstance(embedding, (bool, np.bool_)):
            raise QuantError(f"embedding: expected True or False, found {embedding!r}")
        bits = MODES[mode]
        group_size = DEFAULT_GROUP[bits] if group_size is None else group_size
        if bits == 8 and group_size is not None:
            raise QuantError(f"group_size: int8 is per output channel (group_size None), found {group_size}")
        if bits == 4 and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
            raise QuantError(f"group_size: expected an even positive int for int4, found {group_size!r}")
        try:
            name = DEFAULT_SCALE_DTYPE[bits] if scale_dtype is None else jnp.dtype(scale_dtype).name
        except TypeError:  # a name jnp.dtype does not know ("potato")
            name = repr(scale_dtype)
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
            mode, group_size, scale_dtype, embedding = d["mode"], d["group_size"], d["scale_dtype"], d["embedding"]
        except KeyError as e:
            raise QuantError(f"{where}: the field {e.args[0]!r} is missing") from e
        if not isinstance(mode, str) or mode not in MODES:
            raise QuantError(f"{where}: mode: expected one of {sorted(MODES)}, found {mode!r}")
        if "bits" in d and (type(d["bits"]) is not int or d["bits"] != MODES[mode]):
            raise QuantError(f"{where}: bits: {d['bits']!r} contradicts mode {mode!r} (which is {MODES[mode]} bits)")
        if d.get("symmetric", True) is not True:
            raise QuantError(f"{where}: symmetric: expected true (gemma4_eqx writes only symmetric codes), found "
                             f"{d['symmetric']!r}")
        if not isinstance(embedding, bool):
            raise QuantError(f"{where}: embedding: expected true or false, found {embedding!r}")
        if group_size is not None and type(group_size) is not int:
            raise QuantError(f"{where}: group_size: expected an integer or null, found {group_size!r}")
        if not isinstance(scale_dtype, str):
            raise QuantError(f"{where}: scale_dtype: expected float32, float16 or bfloat16, found {scale_dtype!r}")
        try:
            return cls.make(mode, group_size, scale_dtype, embedding)
        except QuantError as e:
            raise QuantError(f"{where}: {e}") from None
        except TypeError as e:  # a scale_dtype jnp.dtype does not know
            raise QuantError(f"{where}: scale_dtype: expected float32, float16 or bfloat16, found "
                             f"{scale_dtype!r}") from e


# ---- the arithmetic -------------------------------------------------------------------------------------------
def num_groups(n_in: int, group_size: int | None, what: str) -> int:
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
    g = num_groups(n_in, group_size, "quantize")
    wg = w.astype(jnp.float32).reshape(*stack, g, n_in // g, n_out)
    qmax = QMAX[bits]
    amax = jnp.max(jnp.abs(wg), axis=-2)
    scale = (amax / qmax).astype(scale_dtype)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))  # an all-zero group (or one that underflows)
    s32 = scale.astype(jnp.float32)
    q = jnp.clip(jnp.round(wg / s32[..., None, :]), -qmax - (bits == 4), qmax)
    return q.reshape(*stack, n_in, n_out).astype(CODE_DTYPE[bits]), scale


def dequantize(q: Shaped[Array, "*stack n_in n_out"], scales: Float[Array, "*stack groups n_out"],
               dtype: Any = jnp.float32) -> Float[Array, "*stack n_in n_out"]:
    """`q * scale` in fp32, rounded once to `dtype` (exact in fp32: codes and scales are short)."""
    *stack, n_in, n_out = q.shape
    g = scales.shape[-2]
    w = q.astype(jnp.float32).reshape(*stack, g, n_in // g, n_out) * scales.astype(jnp.float32)[..., None, :]
    return w.reshape(q.shape).astype(dtype)


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


def as_quant_config(quantize: Any) -> QuantConfig | None:
    """`load(quantize=...)`: None, "int8", "int4", a `QuantConfig` or a dict of `QuantConfig.make`'s keywords."""
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantConfig.make(quantize)
    if isinstance(quantize, dict):
        return QuantConfig.make(**quantize)
    raise QuantError(f"quantize: expected 'int8', 'int4', a QuantConfig or a dict, found {type(quantize).__name__}")
