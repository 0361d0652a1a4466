"""Low-rank adapters: `LoRALinear`, a final `AbstractLinear` wrapping a `Linear` (`g4.surgery.add_lora` puts them
in a model, `g4.surgery.merge_lora` folds them back)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .linear import AbstractLinear, Linear
from .numerics import compute_dtype
from .policy import Numerics


class LoRALinear(AbstractLinear):
    """`base(x) + scale * (x @ lora_a) @ lora_b`; `lora_b` starts at zero, so the wrapped model is unchanged."""

    base: Linear
    lora_a: Float[Array, "in_features rank"]
    lora_b: Float[Array, "rank out_features"]
    numerics: Numerics  # the adapters' products; the base holds its own
    scale: float = eqx.field(static=True)

    def __init__(self, base: Linear, rank: int, *, key: PRNGKeyArray, alpha: float | None = None):
        dtype = base.weight.dtype
        self.base = base
        self.lora_a = (jax.random.normal(key, (base.in_features, rank), jnp.float32)
                       / jnp.sqrt(base.in_features)).astype(dtype)
        self.lora_b = jnp.zeros((rank, base.out_features), dtype)
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.numerics = base.numerics

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self):
        raise AttributeError("LoRALinear has no single weight: fold the adapters in with "
                             "g4.surgery.merge_lora(model) first (g4.save writes plain Linear weights), or save with "
                             "g4.surgery.save")

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        low = self.numerics.matmul(self.numerics.matmul(x, self.lora_a.astype(x.dtype)), self.lora_b.astype(x.dtype))
        return self.base(x) + (self.scale * low).astype(x.dtype)

    def merged(self) -> Linear:
        dt = compute_dtype(self.base.weight.dtype)
        delta = self.scale * jnp.matmul(self.lora_a.astype(dt), self.lora_b.astype(dt))  # broadcasts stacked axes
        return eqx.tree_at(lambda l: l.weight, self.base, (self.base.weight.astype(dt) + delta).astype(
            self.base.weight.dtype))
