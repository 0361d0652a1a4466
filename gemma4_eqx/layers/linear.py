"""Linear layers. `AbstractLinear` is what every projection of the model is typed as; its implementations are final:
`Linear` (a bias-optional `[in, out]` weight; checkpoint tensors are PyTorch `[out, in]`), `layers.lora.LoRALinear`
(a `Linear` plus low-rank adapters) and `quant.modules.QuantLinear` (int8/int4 codes and scales)."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .policy import XLA, Numerics


class AbstractLinear(eqx.Module):
    """`y = x @ W` for some `[in_features, out_features]` weight held in the implementation's own form."""

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """Input width."""

    @property
    @abc.abstractmethod
    def out_features(self) -> int:
        """Output width."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """The projection of `x`'s last axis."""


class Linear(AbstractLinear):
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
