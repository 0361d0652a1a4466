"""Rotary position embeddings: the default and the proportional schedules (docs/spec/decoder-and-checkpoint.md §4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..config import RopeConfig
from .sleef_pow import torch_cpu_pow


@functools.lru_cache(maxsize=64)
def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """`head_dim // 2` inverse frequencies in float32, bit for bit transformers' table on an x86 CPU.

    default: `theta^(-2j/head_dim)` for every pair.
    proportional: the first `int(partial_rotary_factor * head_dim // 2)` pairs use the same formula, still with the
    *full* head_dim in the exponent; the remaining pairs get frequency 0 (cos 1, sin 0: not rotated).
    The power is torch's (`sleef_pow.torch_cpu_pow`): NumPy's differs by an ulp in 19 of the 12B's 128 sliding
    frequencies, a phase error growing with the position. The array is shared (cached): do not write into it.
    """
    half = head_dim // 2
    rotated = half if rope.rope_type == "default" else int(rope.partial_rotary_factor * head_dim // 2)
    exponents = np.arange(0, 2 * rotated, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = np.zeros((half,), np.float32)
    inv[:rotated] = np.float32(1.0) / torch_cpu_pow(rope.rope_theta, exponents)
    inv.flags.writeable = False
    return inv


def rope_cos_sin(
    positions: Int[Array, " seq"], inv_freq: np.ndarray, dtype
) -> tuple[Float[Array, "seq head_dim"], Float[Array, "seq head_dim"]]:
    """Angles in fp32 (fp64 for fp64 models), cos/sin cast to the activation dtype before use (as transformers)."""
    angle_dtype = jnp.promote_types(dtype, jnp.float32)
    freqs = positions.astype(angle_dtype)[:, None] * jnp.asarray(inv_freq, angle_dtype)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(
    x: Float[Array, "seq heads head_dim"],
    cos: Float[Array, "seq head_dim"],
    sin: Float[Array, "seq head_dim"],
) -> Float[Array, "seq heads head_dim"]:
    """Rotate-half (NeoX) convention: dim i pairs with dim i + head_dim/2."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def _rotate_half(x: Float[Array, "*shape head_dim"]) -> Float[Array, "*shape head_dim"]:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope_rounded(
    x: Float[Array, "seq heads head_dim"],
    cos: Float[Array, "seq head_dim"],
    sin: Float[Array, "seq head_dim"],
) -> Float[Array, "seq heads head_dim"]:
    """`apply_rope` with each product rounded before the add (`numerics="invariant"` and `"torch_cpu"`).

    In `apply_rope` LLVM may contract a product and the add into one fused multiply-add, and whether it does
    depends on how XLA fuses the rotation with its consumers: on an AMD EPYC (Zen 4) the keys a cached call also
    writes into its ring came out unfused while the forward's were fused, one ulp apart. Behind barriers the two
    products are rounded on their own in every program, as torch computes them.
    """
    barrier = jax.lax.optimization_barrier
    return barrier(x * cos[:, None, :]) + barrier(_rotate_half(x) * sin[:, None, :])
