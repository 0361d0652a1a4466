"""The GeGLU feed-forward block of the NNX reference (docs/spec/decoder-and-checkpoint.md §3.5): `down(gelu_tanh(gate(x)) * up(x))`, no bias."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


def gelu_pytorch_tanh(x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the `gelu_pytorch_tanh` activation."""
    c = jnp.asarray(math.sqrt(2.0 / math.pi), x.dtype)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x**3)))


class MLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, std: float = 0.02,
                 dtype=jnp.float32):
        init = nnx.initializers.normal(std)
        linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype,
                                                kernel_init=init, rngs=rngs)
        self.gate_proj = linear(hidden_size, intermediate_size)
        self.up_proj = linear(hidden_size, intermediate_size)
        self.down_proj = linear(intermediate_size, hidden_size)

    def __call__(self, x: Float[Array, "batch seq hidden"]) -> Float[Array, "batch seq hidden"]:
        return self.down_proj(gelu_pytorch_tanh(self.gate_proj(x)) * self.up_proj(x))
