"""A bias-optional linear layer stored as `[in, out]` (checkpoint tensors are PyTorch `[out, in]`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .numerics import rowwise_matmul  # noqa: F401  (re-exported: the invariant matmul)
from .policy import XLA, Numerics


class Linear(eqx.Module):
    """`y = x @ weight (+ bias)`; `weight` is `[in_features, out_features]` so the product needs no transpose.

    The product is the numerics policy's (`Invariant` multiplies one row at a time, so every row goes through the
    same vector-matrix kernel whatever the number of rows).
    """

    weight: Float[Array, "in_features out_features"]
    bias: Float[Array, " out_features"] | None
    numerics: Numerics

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray, use_bias: bool = False,
                 std: float = 0.02, dtype=jnp.float32, numerics: Numerics = XLA()):
        self.weight = (std * jax.random.normal(key, (in_features, out_features), jnp.float32)).astype(dtype)
        self.bias = jnp.zeros((out_features,), dtype) if use_bias else None
        self.numerics = numerics

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1]

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        y = self.numerics.matmul(x, self.weight.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y
