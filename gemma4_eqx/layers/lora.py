"""Low-rank adapters: `LoRALinear`, a final `AbstractLinear` wrapping a `Linear` (`g4.surgery.add_lora` puts fresh
ones in a model, `g4.surgery.attach_lora` given ones, `g4.surgery.merge_lora` folds them back).

Two forms, told apart by whether `lora_scale` is None:

- *uniform* (what `add_lora` makes): every layer of a stacked run has the same rank and the same scaling, held as
  the static float `scale`; `y = base(x) + scale * (x @ lora_a) @ lora_b`.
- *per layer* (what `attach_lora` makes when the layers of one run differ, e.g. a PEFT adapter with
  `layers_to_transform`, `rank_pattern` or `alpha_pattern`): the decoder keeps its layers stacked per run
  (`[repeats, run_length, ...]`), so one `LoRALinear` holds the adapters of every layer of its run. Their ranks are
  zero-padded to the run's largest (`lora_a [in, R]`, `lora_b [R, out]`: the padded columns of A and rows of B are
  zero, so they add exact zeros), the scaling is the per-layer array leaf `lora_scale` (float32, `[]` per layer,
  `[repeats, run_length]` stacked) and each layer's own rank is the integer leaf `lora_rank`. A layer without an
  adapter has `lora_rank` 0, `lora_scale` 0 and zero A and B: it computes `base(x) + 0`, which is `base(x)` bit for
  bit. The static `scale` is 1.0 and unused in this form. Training keeps both exact: the gradients of the padded
  entries and of an adapter whose scaling is 0 are exactly zero, so they stay zero under SGD and Adam, and
  `g4.surgery.only_lora` selects `lora_a` / `lora_b` only (never the scale or the rank).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .linear import AbstractLinear, Linear
from .numerics import compute_dtype
from .policy import Numerics


class LoRALinear(AbstractLinear):
    """`base(x) + scale * (x @ lora_a) @ lora_b` (`lora_scale` in place of `scale` in the per-layer form, see the
    module docstring); fresh adapters start with `lora_b` at zero, so the wrapped model is unchanged."""

    base: Linear
    lora_a: Float[Array, "in_features rank"]
    lora_b: Float[Array, "rank out_features"]
    lora_scale: Float[Array, ""] | None  # per-layer scaling (None: the static `scale`)
    lora_rank: Int[Array, ""] | None  # the layer's own rank <= the padded one (None: all of `rank`)
    numerics: Numerics  # the adapters' products; the base holds its own
    scale: float = eqx.field(static=True)

    def __init__(self, base: Linear, rank: int | None = None, *, key: PRNGKeyArray | None = None,
                 alpha: float | None = None, lora_a: Float[Array, "in_features rank"] | None = None,
                 lora_b: Float[Array, "rank out_features"] | None = None,
                 scale: float | Float[Array, ""] | None = None, used_rank: int | None = None):
        """Fresh adapters: `LoRALinear(base, rank, key=key, alpha=None)` (A random, B zero, `scale = alpha / rank`,
        alpha defaulting to rank). Given ones: `LoRALinear(base, lora_a=A, lora_b=B, scale=s)` with A `[in, r]`
        and B `[r, out]` cast to the base's dtype; a Python float `s` gives the uniform form, a 0-d array the
        per-layer one (`used_rank`: how many leading columns of A / rows of B are the layer's own, the rest must
        be zero padding; 0 for a layer without an adapter, whose `s` must be 0)."""
        dtype = base.weight.dtype
        self.base = base
        self.numerics = base.numerics
        if lora_a is None and lora_b is None:
            if rank is None or key is None or scale is not None or used_rank is not None:
                raise TypeError("LoRALinear: fresh adapters take rank= and key= (and alpha=); given ones lora_a=, "
                                "lora_b= and scale=")
            self.lora_a = (jax.random.normal(key, (base.in_features, rank), jnp.float32)
                           / jnp.sqrt(base.in_features)).astype(dtype)
            self.lora_b = jnp.zeros((rank, base.out_features), dtype)
            self.scale = float(alpha if alpha is not None else rank) / rank
            self.lora_scale = self.lora_rank = None
            return
        if lora_a is None or lora_b is None or scale is None or rank is not None or key is not None or alpha is not None:
            raise TypeError("LoRALinear: given adapters take lora_a=, lora_b= and scale= (and used_rank=), "
                            "without rank, key or alpha")
        if lora_a.shape != (base.in_features, lora_a.shape[-1]) or lora_b.shape != (lora_a.shape[-1],
                                                                                    base.out_features):
            raise ValueError(f"LoRALinear: lora_a {lora_a.shape} and lora_b {lora_b.shape} do not fit a "
                             f"[{base.in_features}, {base.out_features}] projection (expected [in, r] and [r, out])")
        self.lora_a = lora_a.astype(dtype)
        self.lora_b = lora_b.astype(dtype)
        if isinstance(scale, (int, float)):
            if used_rank is not None and used_rank != lora_a.shape[-1]:
                raise ValueError("LoRALinear: used_rank needs the per-layer form (scale given as a 0-d array)")
            self.scale = float(scale)
            self.lora_scale = self.lora_rank = None
        else:
            rank_used = lora_a.shape[-1] if used_rank is None else used_rank
            if not 0 <= rank_used <= lora_a.shape[-1]:
                raise ValueError(f"LoRALinear: used_rank {rank_used} outside [0, {lora_a.shape[-1]}]")
            self.scale = 1.0
            self.lora_scale = jnp.asarray(scale, jnp.float32)
            self.lora_rank = jnp.asarray(rank_used, jnp.int32)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self):
        raise AttributeError("LoRALinear has no single weight: fold the adapters in with "
                             "g4.surgery.merge_lora(model) first (g4.save writes plain Linear weights), save only the "
                             "adapters with g4.save_adapters, or save the whole model with g4.surgery.save")

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        low = self.numerics.matmul(self.numerics.matmul(x, self.lora_a.astype(x.dtype)), self.lora_b.astype(x.dtype))
        scale = self.scale if self.lora_scale is None else self.lora_scale
        return self.base(x) + (scale * low).astype(x.dtype)

    def merged(self) -> Linear:
        dt = compute_dtype(self.base.weight.dtype)
        scale = self.scale if self.lora_scale is None else self.lora_scale[..., None, None].astype(dt)
        delta = scale * jnp.matmul(self.lora_a.astype(dt), self.lora_b.astype(dt))  # broadcasts stacked axes
        return eqx.tree_at(lambda l: l.weight, self.base, (self.base.weight.astype(dt) + delta).astype(
            self.base.weight.dtype))
