"""Normalisation modules of the NNX reference (docs/spec/decoder-and-checkpoint.md §3.2, §6.2), written from transformers' definitions.

- `RMSNorm` is `Gemma4UnifiedRMSNorm`: upcast to fp32 (fp64 stays fp64), `x * pow(mean(x^2) + eps, -0.5)`, times the plain weight
  (not `1 + w`), one cast back to the input dtype. `with_scale=False` holds no parameter (v_norm, the multimodal
  pre-projection norm).
- `LayerNorm` is `torch.nn.LayerNorm(dim)` (affine, with bias, eps 1e-5 by default), computed in fp32.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


def compute_dtype(dtype):
    """fp32 for bf16/f16/fp32 activations, as transformers upcasts; fp64 stays fp64 (for exactness checks)."""
    return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, with_scale: bool = True, dtype=jnp.float32):
        self.eps = eps
        self.with_scale = with_scale
        self.weight = nnx.Param(jnp.ones((dim,), dtype)) if with_scale else None

    def __call__(self, hidden_states: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x = hidden_states.astype(compute_dtype(hidden_states.dtype))
        mean_squared = jnp.mean(x**2, axis=-1, keepdims=True) + self.eps
        normed = x * jnp.power(mean_squared, -0.5)
        if self.with_scale:
            normed = normed * self.weight[...].astype(x.dtype)
        return normed.astype(hidden_states.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(compute_dtype(x.dtype))
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)  # biased, as torch
        y = centred / jnp.sqrt(variance + self.eps)
        y = y * self.weight[...].astype(xf.dtype) + self.bias[...].astype(xf.dtype)
        return y.astype(x.dtype)
