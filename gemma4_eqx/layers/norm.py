"""Normalisation layers (spec §3.2, §6.2)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .numerics import FIXED_ORDER_SUMS, check_numerics, reciprocal_sqrt, replaced, torch_cpu_mean


def compute_dtype(dtype):
    """fp32 for bf16/f16/fp32 activations (as transformers upcasts), fp64 stays fp64 (for gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(eqx.Module):
    """Gemma 4 RMSNorm: fp32 inside, `x * (mean(x^2) + eps)^-0.5 * w` with a plain `w` (not `1 + w`).

    `weight=None` is the scale-free variant used for `v_norm` and the multimodal pre-projection norm.
    The result is cast once, back to the input dtype. `numerics="torch_cpu"` sums the mean of squares in torch's
    CPU order and takes the -0.5 power as torch does (`layers/numerics.py`); `"invariant"` does the same, for its
    fixed order.
    """

    weight: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)
    numerics: str = eqx.field(static=True, default="xla")

    def __init__(self, dim: int, *, eps: float = 1e-6, with_scale: bool = True, dtype=jnp.float32,
                 numerics: str = "xla"):
        self.weight = jnp.ones((dim,), dtype) if with_scale else None
        self.eps = eps
        self.numerics = check_numerics(numerics)

    def with_numerics(self, numerics: str) -> "RMSNorm":
        return replaced(self, numerics=check_numerics(numerics))

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        xf = x.astype(compute_dtype(x.dtype))
        if self.numerics in FIXED_ORDER_SUMS:
            # The barrier keeps LLVM from contracting the squares into the sum's adds (fused multiply-adds).
            square = jax.lax.optimization_barrier(xf * xf)
            y = xf * reciprocal_sqrt(torch_cpu_mean(square) + self.eps)[..., None]
        else:
            # pow(., -0.5) rather than rsqrt, as transformers does to stay close to JAX references.
            y = xf * jnp.power(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps, -0.5)
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
