"""The encoder-free multimodal embedders of the NNX reference (docs/spec/decoder-and-checkpoint.md §6.2, §6.3), batched over images / clips.

Vision (`Gemma4UnifiedVisionEmbedder`): cast to the weight dtype -> LayerNorm(eps 1e-5) -> Linear(+bias) ->
LayerNorm -> + pos_embedding[x, 0] + pos_embedding[y, 1] (each term zeroed where that coordinate is -1) ->
LayerNorm -> scale-free RMSNorm -> Linear(no bias). Audio (`Gemma4UnifiedMultimodalEmbedder`): cast ->
scale-free RMSNorm -> Linear; transformers uses the bare `MultimodalEmbedder` as `embed_audio`, so does this.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ..config import TextConfig, VisionConfig
from .norms import LayerNorm, RMSNorm


class MultimodalEmbedder(nnx.Module):
    """Scale-free RMSNorm then a bias-free projection into the text hidden size."""

    def __init__(self, in_dim: int, hidden_size: int, *, eps: float, std: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps=eps, with_scale=False)
        self.embedding_projection = nnx.Linear(in_dim, hidden_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                               kernel_init=nnx.initializers.normal(std), rngs=rngs)

    def __call__(self, inputs_embeds: Float[Array, "*batch in_dim"]) -> Float[Array, "*batch hidden"]:
        x = inputs_embeds.astype(self.embedding_projection.kernel[...].dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionEmbedder(nnx.Module):
    def __init__(self, vision: VisionConfig, text: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        std, eps = vision.initializer_range, vision.layer_norm_eps
        self.patch_ln1 = LayerNorm(vision.patch_dim, eps=eps, dtype=dtype)
        self.patch_dense = nnx.Linear(vision.patch_dim, vision.mm_embed_dim, use_bias=True, dtype=dtype,
                                      param_dtype=dtype, kernel_init=nnx.initializers.normal(std), rngs=rngs)
        self.patch_ln2 = LayerNorm(vision.mm_embed_dim, eps=eps, dtype=dtype)
        self.pos_embedding = nnx.Param(
            (std * nnx.initializers.normal(1.0)(rngs.params(), (vision.mm_posemb_size, 2, vision.mm_embed_dim),
                                                jnp.float32)).astype(dtype))
        self.pos_norm = LayerNorm(vision.mm_embed_dim, eps=eps, dtype=dtype)
        self.multimodal_embedder = MultimodalEmbedder(vision.output_proj_dims, text.hidden_size, eps=vision.rms_norm_eps,
                                                      std=std, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        pixel_values: Float[Array, "images patches patch_dim"],
        image_position_ids: Int[Array, "images patches 2"],
    ) -> Float[Array, "images patches hidden"]:
        h = pixel_values.astype(self.patch_dense.kernel[...].dtype)
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(h)))
        table = self.pos_embedding[...]
        clamped = jnp.maximum(image_position_ids, 0)
        valid = (image_position_ids != -1).astype(table.dtype)[..., None]  # [images, patches, 2, 1]
        pos = table[clamped, jnp.arange(2)] * valid  # [images, patches, 2, embed]
        h = self.pos_norm(h + jnp.sum(pos, axis=-2))
        return self.multimodal_embedder(h)
