"""The GeGLU feed-forward block."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import Linear
from .policy import XLA, Numerics


class MLP(eqx.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`, no biases. The GELU's rounding is the numerics policy's (`TorchCPU`:
    as torch's CPU kernel)."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    numerics: Numerics

    def __init__(self, hidden_size: int, intermediate_size: int, *, key: PRNGKeyArray, std: float = 0.02,
                 dtype=jnp.float32, numerics: Numerics = XLA()):
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = Linear(hidden_size, intermediate_size, key=k1, std=std, dtype=dtype, numerics=numerics)
        self.up_proj = Linear(hidden_size, intermediate_size, key=k2, std=std, dtype=dtype, numerics=numerics)
        self.down_proj = Linear(intermediate_size, hidden_size, key=k3, std=std, dtype=dtype, numerics=numerics)
        self.numerics = numerics

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        act = self.numerics.gelu_tanh(self.gate_proj(x))
        return self.down_proj(act * self.up_proj(x))
