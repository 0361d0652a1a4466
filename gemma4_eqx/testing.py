"""Random models whose weights do not hide bugs (for tests, the bundled checkpoint and benchmarks).

A freshly initialised Gemma 4 has every norm weight and `layer_scalar` equal to 1, which hides a `1 + w` vs `w`
mix-up or a missing scalar. `perturbed` moves every one of them away from 1 while keeping the random network
well-conditioned (the same scheme as scripts/record_hf_reference.py): with attention scale 1.0 and q/k norms
near 1 a random network is chaotic, and with a large embedding it only repeats its input.

- tied embedding ~ N(0, 0.6^2); linear weights ~ N(0, 1/fan_in)
- RMSNorm weights gain * (1 + 0.3 N(0,1)): gain 3.6 for post-attention/post-feedforward norms, 0.4 for
  q_norm/k_norm, 1 elsewhere
- vision LayerNorms: weight 1 + 0.3 N(0,1), bias N(0, 0.2^2); position table N(0, 0.5^2)
- layer scalars ~ U(0.5, 1.5)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .config import FULL, SLIDING, AssistantConfig, Gemma4Config
from .layers.attention import AbstractAttention, Attention
from .model.assistant import Assistant
from .model.gemma4 import Gemma4

_NORM_GAINS = {"post_attention_layernorm": 3.6, "post_feedforward_layernorm": 3.6, "q_norm": 0.4, "k_norm": 0.4}


def _path_name(path) -> str:
    return ".".join(str(getattr(p, "name", getattr(p, "key", p))) for p in path)


def perturbed(model: Gemma4, key: PRNGKeyArray) -> Gemma4:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    keys = iter(jax.random.split(key, len(leaves)))
    out = []
    for path, x in leaves:
        name = _path_name(path)
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        k = next(keys)
        normal = lambda std, center=0.0: (center + std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        if name == "embed_tokens":
            x = normal(0.6)
        elif name.endswith("layer_scalar"):
            x = jax.random.uniform(k, x.shape, jnp.float32, 0.5, 1.5).astype(x.dtype)
        elif name.endswith("pos_embedding"):
            x = normal(0.5)
        elif name.endswith(".bias"):
            x = normal(0.02 if module == "patch_dense" else 0.2)
        elif module.endswith("_proj") or module in ("patch_dense", "embedding_projection"):  # [.., in, out]
            x = normal(x.shape[-2] ** -0.5)
        elif name.endswith(".weight"):  # RMSNorm / LayerNorm weight
            x = (_NORM_GAINS.get(module, 1.0) * normal(0.3, 1.0).astype(jnp.float32)).astype(x.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def random_model(config: Gemma4Config, seed: int = 0, dtype=jnp.float32, **kwargs) -> Gemma4:
    """A `Gemma4` with well-conditioned random weights and no norm weight or scalar left at 1."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return perturbed(Gemma4(config, key=k1, dtype=dtype, **kwargs), k2)


def leaf_name(path) -> str:
    """A leaf's dotted path in the model (`layers.runs.0.self_attn.q_proj.weight`)."""
    return _path_name(path)


def filled_model(config: Gemma4Config, fill, *, seed: int = 0, dtype=jnp.float32, **model_kwargs) -> Gemma4:
    """A `Gemma4` built abstractly (nothing compiled, nothing initialised twice) whose every array leaf is
    `fill(name, shape, rng)`: a numpy array drawn from `rng = np.random.default_rng(seed)`, cast to `dtype`.

    The one factory the tests build their random models with; each passes the draw its checks need.
    """
    rng = np.random.default_rng(seed)
    abstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **model_kwargs))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(np.asarray(fill(_path_name(path), x.shape, rng), np.float32), x.dtype),
        abstract)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event for one XLA compilation


@contextlib.contextmanager
def counting_compilations() -> Iterator[list[float]]:
    """Within the block, the list receives the duration (s) of every XLA compilation: `len(seen)` programs were
    compiled (a cache hit compiles nothing). For checking that repeated calls reuse their programs."""
    seen: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def random_assistant(target, *, key: PRNGKeyArray, hidden_size: int = 32, intermediate_size: int = 64,
                     num_attention_heads: int | None = None, use_ordered_embeddings: bool = False,
                     num_centroids: int = 16, top_k: int = 4, dtype=jnp.float32) -> Assistant:
    """A random drafter whose geometry fits `target` (4 layers: 3 sliding + 1 full), for tests and training."""
    t = target.config.text
    heads = num_attention_heads or t.num_attention_heads
    text = dataclasses.replace(t, hidden_size=hidden_size, intermediate_size=intermediate_size,
                               num_hidden_layers=4, num_attention_heads=heads,
                               layer_types=(SLIDING, SLIDING, SLIDING, FULL))
    cfg = AssistantConfig(text=text, backbone_hidden_size=t.hidden_size,
                          use_ordered_embeddings=use_ordered_embeddings, num_centroids=num_centroids,
                          centroid_intermediate_top_k=top_k)
    return Assistant(cfg, key=key, dtype=dtype)


class WrappedAttention(AbstractAttention):
    """An attention replacement that computes exactly what it wraps but is another pytree type: putting it in one
    layer (`g4.surgery.replace_attention(m, lambda old, i: WrappedAttention(old), [i])`) regroups the stack while
    every number stays the same (tests of regrouped stacks)."""

    inner: Attention

    def __call__(self, x, positions, mask, band=None):
        return self.inner(x, positions, mask, band)

    def with_cache(self, x, positions, kv, ctx):
        return self.inner.with_cache(x, positions, kv, ctx)
