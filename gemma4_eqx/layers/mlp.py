"""The GeGLU feed-forward block."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import AbstractLinear, Linear
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


class FusedMLP(eqx.Module):
    """`MLP` with the gate and up projections side by side in one `[hidden, 2 * intermediate]` weight: one product
    instead of two (`g4.serving_layout`). The same function; XLA may round the fused product differently.

    A serving layout only: `gate_proj` and `up_proj` are read-only views of the two halves, so the checkpoint
    names, `g4.save` and the bridge still see transformers' tensors; training, LoRA and loading work on `MLP`.
    """

    gate_up: AbstractLinear  # a Linear; `g4.quantize` makes it a quantized layer
    down_proj: Linear
    numerics: Numerics

    @classmethod
    def of(cls, mlp: MLP) -> FusedMLP:
        """`mlp`'s weights fused (both projections must be plain `Linear`s of one dtype)."""
        gate, up = mlp.gate_proj, mlp.up_proj
        if type(gate) is not Linear or type(up) is not Linear:
            raise TypeError(f"FusedMLP.of: gate_proj and up_proj must be plain Linear layers, found "
                            f"{type(gate).__name__} and {type(up).__name__} (merge adapters first)")
        if gate.weight.dtype != up.weight.dtype or (gate.bias is None) != (up.bias is None):
            raise TypeError("FusedMLP.of: gate_proj and up_proj differ in dtype or bias")
        joined = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=-1)
        gate_up = eqx.tree_at(lambda l: (l.weight, l.bias), gate, (joined(gate.weight, up.weight),
                                                                    joined(gate.bias, up.bias)),
                              is_leaf=lambda x: x is None)
        return cls(gate_up=gate_up, down_proj=mlp.down_proj, numerics=mlp.numerics)

    def __call__(self, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
        gate_up = self.gate_up(x)
        n = self.intermediate_size
        return self.down_proj(self.numerics.gelu_tanh(gate_up[..., :n]) * gate_up[..., n:])

    @property
    def intermediate_size(self) -> int:
        return self.gate_up.out_features // 2  # a Linear, or its `g4.quantize`d form

    def _half(self, which: int) -> AbstractLinear:
        """The gate (0) or up (1) projection as its own layer: every array of `gate_up` whose last axis holds both
        halves (a Linear's weight and bias; a quantized layer's codes and scales) cut to one."""
        n = self.intermediate_size
        cut = lambda a: a[..., which * n:(which + 1) * n] if eqx.is_array(a) and a.shape[-1] == 2 * n else a
        return jax.tree.map(cut, self.gate_up)

    @property
    def gate_proj(self) -> AbstractLinear:
        return self._half(0)

    @property
    def up_proj(self) -> AbstractLinear:
        return self._half(1)
