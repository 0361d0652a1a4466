"""Normalisation layers: Gemma's RMSNorm and the vision embedder's LayerNorm."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .numerics import compute_dtype
from .policy import XLA, Numerics

__all__ = ["LayerNorm", "RMSNorm", "compute_dtype"]


class RMSNorm(eqx.Module):
    """Gemma 4 RMSNorm: fp32 inside, `x * (mean(x^2) + eps)^-0.5 * w` with a plain `w` (not `1 + w`).

    `weight=None` is the scale-free variant used for `v_norm` and the multimodal pre-projection norm.
    The result is cast once, back to the input dtype. The mean of squares and the power are the numerics
    policy's (`TorchCPU` and `Invariant` sum in torch's CPU cascade order).
    """

    weight: Float[Array, " dim"] | None
    numerics: Numerics
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, with_scale: bool = True, dtype=jnp.float32,
                 numerics: Numerics = XLA()):
        self.weight = jnp.ones((dim,), dtype) if with_scale else None
        self.eps = eps
        self.numerics = numerics

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(compute_dtype(x.dtype))
        y = xf * self.numerics.inverse_rms(xf, self.eps)
        if self.weight is not None:
            y = y * self.weight.astype(xf.dtype)
        return y.astype(x.dtype)


class LayerNorm(eqx.Module):
    """torch.nn.LayerNorm with weight and bias (the vision embedder's LNs, eps 1e-5), fp32 inside."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(compute_dtype(x.dtype))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jnp.power(var + self.eps, -0.5)
        y = y * self.weight.astype(xf.dtype) + self.bias.astype(xf.dtype)
        return y.astype(x.dtype)
