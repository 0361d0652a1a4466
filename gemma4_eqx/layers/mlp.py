"""The GeGLU feed-forward block (spec §3.5)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import Linear
from .norm import compute_dtype
from .numerics import check_numerics, gelu_tanh_torch_cpu, replaced


class MLP(eqx.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`, no biases. `numerics="torch_cpu"`: the GELU rounds as torch's CPU kernel."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    numerics: str = eqx.field(static=True, default="xla")

    def __init__(self, hidden_size: int, intermediate_size: int, *, key: PRNGKeyArray, std: float = 0.02,
                 dtype=jnp.float32, numerics: str = "xla"):
        self.numerics = check_numerics(numerics)
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = Linear(hidden_size, intermediate_size, key=k1, std=std, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, key=k2, std=std, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, key=k3, std=std, dtype=dtype)

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        gate = self.gate_proj(x)
        if self.numerics == "torch_cpu":
            act = gelu_tanh_torch_cpu(gate)  # 16-bit inputs by table, with the float32 rounding built in
        else:
            # The activation is evaluated in fp32 and rounded once, as torch's reduced-precision GELU kernel does.
            act = jax.nn.gelu(gate.astype(compute_dtype(gate.dtype)), approximate=True).astype(gate.dtype)
        return self.down_proj(act * self.up_proj(x))

    def with_numerics(self, numerics: str) -> "MLP":
        """The same block (same arrays) with its GELU and its three projections in another numerics mode."""
        names = ("gate_proj", "up_proj", "down_proj")
        projections = {name: getattr(self, name).with_numerics(numerics) for name in names}
        return replaced(self, numerics=check_numerics(numerics), **projections)
