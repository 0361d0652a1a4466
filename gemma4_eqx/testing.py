"""Random models whose weights do not hide bugs (for tests, the bundled checkpoint and benchmarks).

A freshly initialised Gemma 4 has every norm weight and `layer_scalar` equal to 1, which hides a `1 + w` vs `w`
mix-up or a missing scalar. `perturbed` moves them away from 1 and gives the embedding a scale at which the
final soft cap is active.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from .config import Gemma4Config
from .layers.norm import LayerNorm, RMSNorm
from .model import Gemma4


def perturbed(model: Gemma4, key: PRNGKeyArray, *, embed_std: float = 1.0) -> Gemma4:
    """Norm weights ~ 1 + 0.3 N(0,1), LayerNorm biases ~ 0.1 N(0,1), layer scalars ~ U(0.5, 1.5)."""
    keys = iter(jax.random.split(key, 4096))

    def jitter(x, scale, center):
        return (center + scale * jax.random.normal(next(keys), x.shape, jnp.float32)).astype(x.dtype)

    is_norm = lambda x: isinstance(x, (RMSNorm, LayerNorm))
    norms = [n for n in jax.tree.leaves(model, is_leaf=is_norm) if is_norm(n) and getattr(n, "weight", None) is not None]
    new_norms = []
    for n in norms:
        n = eqx.tree_at(lambda n: n.weight, n, jitter(n.weight, 0.3, 1.0))
        if isinstance(n, LayerNorm):
            n = eqx.tree_at(lambda n: n.bias, n, jitter(n.bias, 0.1, 0.0))
        new_norms.append(n)
    model = eqx.tree_at(
        lambda m: [n for n in jax.tree.leaves(m, is_leaf=is_norm) if is_norm(n) and getattr(n, "weight", None) is not None],
        model, new_norms)
    scalars = [run.layer_scalar for run in model.layers.runs]
    new_scalars = [jax.random.uniform(next(keys), s.shape, jnp.float32, 0.5, 1.5).astype(s.dtype) for s in scalars]
    model = eqx.tree_at(lambda m: [run.layer_scalar for run in m.layers.runs], model, new_scalars)
    embed = (embed_std * jax.random.normal(next(keys), model.embed_tokens.shape)).astype(model.dtype)
    return eqx.tree_at(lambda m: m.embed_tokens, model, embed)


def random_model(config: Gemma4Config, seed: int = 0, dtype=jnp.float32, **kwargs) -> Gemma4:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return perturbed(Gemma4(config, key=k1, dtype=dtype, **kwargs), k2)
