"""The encoder-free multimodal embedders (docs/spec/decoder-and-checkpoint.md §6.2, §6.3).

Vision: raw 48x48x3 patch vector -> LayerNorm -> Linear(+bias) -> LayerNorm -> + factorised 2-D position
embedding -> LayerNorm -> scale-free RMSNorm -> Linear. Audio: 640-sample frame -> scale-free RMSNorm -> Linear.
Both work on one image / clip at a time; the model `vmap`s them.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import AudioConfig, TextConfig, VisionConfig
from ..layers.linear import Linear
from ..layers.norm import LayerNorm, RMSNorm


class MultimodalProjection(eqx.Module):
    """Scale-free RMSNorm then a bias-free Linear into the text hidden size (`Gemma4UnifiedMultimodalEmbedder`)."""

    embedding_pre_projection_norm: RMSNorm
    embedding_projection: Linear

    def __init__(self, in_dim: int, hidden_size: int, *, eps: float, key: PRNGKeyArray, std: float,
                 dtype=jnp.float32):
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps=eps, with_scale=False)
        self.embedding_projection = Linear(in_dim, hidden_size, key=key, std=std, dtype=dtype)

    def __call__(self, x: Float[Array, "tokens in_dim"]) -> Float[Array, "tokens hidden"]:
        x = x.astype(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionEmbedder(eqx.Module):
    patch_ln1: LayerNorm
    patch_dense: Linear
    patch_ln2: LayerNorm
    pos_embedding: Float[Array, "posemb 2 embed"]
    pos_norm: LayerNorm
    projection: MultimodalProjection

    def __init__(self, vision: VisionConfig, text: TextConfig, *, key: PRNGKeyArray, dtype=jnp.float32):
        kd, kp, kr = jax.random.split(key, 3)
        std, eps = vision.initializer_range, vision.layer_norm_eps
        self.patch_ln1 = LayerNorm(vision.patch_dim, eps=eps, dtype=dtype)
        self.patch_dense = Linear(vision.patch_dim, vision.mm_embed_dim, key=kd, use_bias=True, std=std, dtype=dtype)
        self.patch_ln2 = LayerNorm(vision.mm_embed_dim, eps=eps, dtype=dtype)
        self.pos_embedding = (std * jax.random.normal(kp, (vision.mm_posemb_size, 2, vision.mm_embed_dim))).astype(dtype)
        self.pos_norm = LayerNorm(vision.mm_embed_dim, eps=eps, dtype=dtype)
        self.projection = MultimodalProjection(vision.output_proj_dims, text.hidden_size, eps=vision.rms_norm_eps,
                                               key=kr, std=std, dtype=dtype)

    @property
    def patch_dim(self) -> int:
        return self.patch_dense.in_features

    def __call__(
        self,
        patches: Float[Array, "patches patch_dim"],
        positions: Int[Array, "patches 2"],
    ) -> Float[Array, "patches hidden"]:
        """Patches of one image (padding rows included) with their (x, y) positions; (-1, -1) marks padding."""
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.astype(self.patch_dense.weight.dtype))))
        valid = (positions != -1).astype(h.dtype)  # [patches, 2]: each axis contributes only where it is set
        clamped = jnp.maximum(positions, 0)
        pos = (self.pos_embedding[clamped[:, 0], 0] * valid[:, :1]
               + self.pos_embedding[clamped[:, 1], 1] * valid[:, 1:])
        return self.projection(self.pos_norm(h + pos))


class AudioEmbedder(eqx.Module):
    projection: MultimodalProjection

    def __init__(self, audio: AudioConfig, text: TextConfig, *, key: PRNGKeyArray, dtype=jnp.float32):
        self.projection = MultimodalProjection(audio.audio_embed_dim, text.hidden_size, eps=audio.rms_norm_eps,
                                               key=key, std=audio.initializer_range, dtype=dtype)

    @property
    def frame_size(self) -> int:
        return self.projection.embedding_projection.in_features

    def __call__(self, frames: Float[Array, "frames samples"]) -> Float[Array, "frames hidden"]:
        """Raw waveform frames of one clip (no mel, no normalisation)."""
        return self.projection(frames)
