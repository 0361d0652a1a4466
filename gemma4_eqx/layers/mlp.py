"""The GeGLU feed-forward block (spec §3.5)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import Linear
from .norm import compute_dtype


class MLP(eqx.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`, no biases."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear

    def __init__(self, hidden_size: int, intermediate_size: int, *, key: PRNGKeyArray, std: float = 0.02,
                 dtype=jnp.float32):
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = Linear(hidden_size, intermediate_size, key=k1, std=std, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, key=k2, std=std, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, key=k3, std=std, dtype=dtype)

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        gate = self.gate_proj(x)
        # The activation is evaluated in fp32 and rounded once, as torch's reduced-precision GELU kernel does.
        act = jax.nn.gelu(gate.astype(compute_dtype(gate.dtype)), approximate=True).astype(gate.dtype)
        return self.down_proj(act * self.up_proj(x))
