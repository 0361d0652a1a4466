"""One decoder layer of the NNX reference (docs/spec/decoder-and-checkpoint.md §3.3): sandwich norms around attention and MLP, then the
per-layer `layer_scalar`, applied once after the MLP residual add.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from ..config import TextConfig
from .attention import Attention
from .mlp import MLP
from .norms import RMSNorm


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type, rngs=rngs, dtype=dtype)
        self.mlp = MLP(d, cfg.intermediate_size, rngs=rngs, std=cfg.initializer_range, dtype=dtype)
        self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.pre_feedforward_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.post_feedforward_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
        # A stored [1] tensor in the checkpoint (a persistent buffer in transformers); a parameter here.
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype))

    def __call__(
        self,
        hidden_states: Float[Array, "batch seq hidden"],
        cos: Float[Array, "batch seq head_dim"],
        sin: Float[Array, "batch seq head_dim"],
        mask: Bool[Array, "batch seq seq"],
    ) -> Float[Array, "batch seq hidden"]:
        residual = hidden_states
        attn = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask)
        hidden_states = residual + self.post_attention_layernorm(attn)
        residual = hidden_states
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        hidden_states = residual + self.post_feedforward_layernorm(mlp)
        return hidden_states * self.layer_scalar[...].astype(hidden_states.dtype)
