"""A bias-optional linear layer stored as `[in, out]` (checkpoint tensors are PyTorch `[out, in]`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .numerics import check_numerics, replaced


def rowwise_matmul(x: Float[Array, "*batch k"], w: Float[Array, "k n"]) -> Float[Array, "*batch n"]:
    """`x @ w` one row of `x` at a time, each through the same vector-matrix kernel (`numerics="invariant"`)."""
    barrier = jax.lax.optimization_barrier
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.map(lambda row: barrier(barrier(row) @ w), rows)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Linear(eqx.Module):
    """`y = x @ weight (+ bias)`; `weight` is `[in_features, out_features]` so the product needs no transpose.

    `numerics="invariant"` multiplies one row at a time (`jax.lax.map`), so every row goes through the same
    vector-matrix kernel: XLA picks a matmul's summation order by its shape (on CPU a 64-row product of a 64x32
    weight rounds row 0 differently from a 1-row one), which would make a token's result depend on how many
    tokens share the call. Slow for long prompts; decode (one row) costs the same.
    """

    weight: Float[Array, "in_features out_features"]
    bias: Float[Array, " out_features"] | None
    numerics: str = eqx.field(static=True, default="xla")

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray, use_bias: bool = False,
                 std: float = 0.02, dtype=jnp.float32):
        self.weight = (std * jax.random.normal(key, (in_features, out_features), jnp.float32)).astype(dtype)
        self.bias = jnp.zeros((out_features,), dtype) if use_bias else None

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1]

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        w = self.weight.astype(x.dtype)
        y = rowwise_matmul(x, w) if self.numerics == "invariant" else jnp.matmul(x, w)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y

    def with_numerics(self, numerics: str) -> "Linear":
        return replaced(self, numerics=check_numerics(numerics))
