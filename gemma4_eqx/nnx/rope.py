"""Rotary embeddings of the NNX reference (docs/spec/decoder-and-checkpoint.md §4), after transformers' rotary class and
`_compute_proportional_rope_parameters`: fp32 inverse frequencies and angles, cos/sin cast to the activation
dtype, rotate-half.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..config import RopeConfig
from ..layers.sleef_pow import torch_cpu_pow


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """`head_dim / 2` fp32 inverse frequencies.

    default: `1 / theta^(arange(0, head_dim, 2) / head_dim)`.
    proportional: `rope_angles = int(partial_rotary_factor * head_dim // 2)` frequencies with the same formula
    (the exponent keeps the *full* head_dim), followed by `head_dim/2 - rope_angles` zeros (unrotated dims).
    The power is torch's on the CPU (`layers.sleef_pow.torch_cpu_pow`), NumPy's differs in the last bit.
    """
    if rope.rope_type == "default":
        return np.float32(1.0) / torch_cpu_pow(rope.rope_theta, np.arange(0, head_dim, 2).astype(np.float32)
                                               / np.float32(head_dim))
    rope_angles = int(rope.partial_rotary_factor * head_dim // 2)
    rotated = np.float32(1.0) / torch_cpu_pow(rope.rope_theta, np.arange(0, 2 * rope_angles, 2).astype(np.float32)
                                              / np.float32(head_dim))
    nope = np.zeros((head_dim // 2 - rope_angles,), np.float32)
    return np.concatenate([rotated.astype(np.float32), nope])


def rope_cos_sin(
    position_ids: Int[Array, "batch seq"], inv_freq: np.ndarray, dtype
) -> tuple[Float[Array, "batch seq head_dim"], Float[Array, "batch seq head_dim"]]:
    angle_dtype = jnp.promote_types(dtype, jnp.float32)  # fp32 angles (fp64 for an fp64 model)
    freqs = position_ids[..., None].astype(angle_dtype) * jnp.asarray(inv_freq, angle_dtype)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Float[Array, "*batch head_dim"]) -> Float[Array, "*batch head_dim"]:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(
    x: Float[Array, "batch seq heads head_dim"],
    cos: Float[Array, "batch seq head_dim"],
    sin: Float[Array, "batch seq head_dim"],
) -> Float[Array, "batch seq heads head_dim"]:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
