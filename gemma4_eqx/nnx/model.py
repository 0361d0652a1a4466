"""`Gemma4NNX`: Gemma 4 12B Unified as a stateful Flax NNX module, batched `[batch, seq]` like transformers.

This is the project's independent cross-check of the Equinox model: written from the spec and transformers'
`Gemma4UnifiedForConditionalGeneration`, one python list entry per decoder layer, no scan, nothing shared with
the Equinox layers except the config and the checkpoint names. Attribute paths follow transformers' module
names (`layers[i].self_attn.q_proj`, `embed_vision.multimodal_embedder.embedding_projection`, ...), with NNX's
`kernel` (stored `[in, out]`) for a linear weight and `embedding` for the token table.
Spec (docs/spec/decoder-and-checkpoint.md): §3 (decoder), §4 (RoPE), §5 (masks), §6 (splice).
"""

from __future__ import annotations

import math

import equinox as eqx  # only for eqx.error_if: a readable error from inside jit
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ..config import FULL, SLIDING, Gemma4Config
from ..model.media import Media
from .decoder import DecoderLayer
from .embedders import MultimodalEmbedder, VisionEmbedder
from .masks import attention_masks, block_sequence_ids
from .norms import RMSNorm
from .rope import rope_cos_sin, rope_inv_freq

Ints = Int[Array | np.ndarray, "batch seq"]
Mask = Bool[Array | np.ndarray, "batch seq"] | Int[Array | np.ndarray, "batch seq"]


def masked_scatter(
    inputs_embeds: Float[Array, "batch seq hidden"],
    slots: Bool[Array, "batch seq"],
    features: Float[Array, "items hidden"],
    keep: Bool[Array, " items"],
    what: str,
) -> Float[Array, "batch seq hidden"]:
    """transformers' `masked_scatter`: the kept feature rows, in order, fill the placeholder rows in row-major
    (batch, position) order. The two counts must agree (checked eagerly, and at run time under jit)."""
    b, s, d = inputs_embeds.shape
    flat_slots = slots.reshape(-1)
    n_slots, n_keep = jnp.sum(flat_slots), jnp.sum(keep)
    message = f"{what}: the batch has {{}} placeholder tokens but the inputs give {{}} valid soft tokens; they must match"
    if not isinstance(n_slots, jax.core.Tracer) and not isinstance(n_keep, jax.core.Tracer):
        if int(n_slots) != int(n_keep):
            raise ValueError(message.format(int(n_slots), int(n_keep)))
    else:
        inputs_embeds = eqx.error_if(inputs_embeds, n_slots != n_keep, message.format("some", "a different number of"))
    n = features.shape[0]
    dest = jnp.nonzero(flat_slots, size=n, fill_value=b * s)[0]  # k-th placeholder row (out of range: dropped)
    src = jnp.nonzero(keep, size=n, fill_value=0)[0]  # k-th kept feature row
    flat = inputs_embeds.reshape(b * s, d)
    flat = flat.at[dest].set(features[src].astype(flat.dtype), mode="drop")
    return flat.reshape(b, s, d)


class Gemma4NNX(nnx.Module):
    """Embedding, multimodal splice, decoder layers, final norm and tied soft-capped logits."""

    def __init__(self, config: Gemma4Config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        t = config.text
        self.config = config
        self.embed_tokens = nnx.Embed(t.vocab_size, t.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(t.initializer_range), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(t, layer_type, rngs=rngs, dtype=dtype) for layer_type in t.layer_types])
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype)
        self.embed_vision = (None if config.vision is None
                             else VisionEmbedder(config.vision, t, rngs=rngs, dtype=dtype))
        self.embed_audio = (None if config.audio is None else MultimodalEmbedder(
            config.audio.audio_embed_dim, t.hidden_size, eps=config.audio.rms_norm_eps,
            std=config.audio.initializer_range, rngs=rngs, dtype=dtype))

    @property
    def dtype(self):
        return self.embed_tokens.embedding.get_value().dtype

    # ---- multimodal features ---------------------------------------------------------------------
    def get_image_features(
        self,
        pixel_values: Float[Array | np.ndarray, "images patches patch_dim"],
        image_position_ids: Int[Array | np.ndarray, "images patches 2"],
    ) -> Float[Array, "images patches hidden"]:
        """Soft tokens of every patch, padding patches included (rows whose position is (-1, -1))."""
        if self.embed_vision is None:
            raise ValueError("pixel_values: this model has no vision_config, so it cannot embed images")
        v = self.config.vision
        if pixel_values.shape[-1] != v.patch_dim:
            raise ValueError(f"pixel_values: expected patch vectors of {v.patch_dim} values "
                             f"({v.model_patch_size}x{v.model_patch_size}x3), found {pixel_values.shape[-1]}")
        if image_position_ids.shape != (*pixel_values.shape[:2], 2):
            raise ValueError(f"image_position_ids: expected shape {[*pixel_values.shape[:2], 2]}, "
                             f"found {list(image_position_ids.shape)}")
        if not isinstance(image_position_ids, jax.core.Tracer):
            # np.asarray: a concrete array closed over by a jitted caller stays concrete (np.min would call its
            # .min method, which jit stages out)
            where = np.asarray(image_position_ids)
            lo, hi = int(where.min()), int(where.max())
            if lo < -1 or hi >= v.mm_posemb_size:
                raise ValueError(f"image_position_ids: coordinates must lie in [0, {v.mm_posemb_size}) (mm_posemb_size) "
                                 f"or be -1 for padding; found values in [{lo}, {hi}]")
        return self.embed_vision(jnp.asarray(pixel_values), jnp.asarray(image_position_ids))

    def get_audio_features(
        self, input_features: Float[Array | np.ndarray, "clips frames samples"]
    ) -> Float[Array, "clips frames hidden"]:
        """Soft tokens of every 640-sample frame, padding frames included."""
        if self.embed_audio is None:
            raise ValueError("input_features: this model has no audio_config, so it cannot embed audio")
        size = self.config.audio.audio_embed_dim
        if input_features.shape[-1] != size:
            raise ValueError(f"input_features: expected frames of {size} samples, found {input_features.shape[-1]}")
        return self.embed_audio(jnp.asarray(input_features))

    def embed(
        self,
        input_ids: Ints,
        *,
        media: Media | None = None,
        **media_kwargs,
    ) -> Float[Array, "batch seq hidden"]:
        """Scaled token embeddings with the soft tokens of every image, video frame and audio clip spliced in
        (media stacked across the batch, as transformers' processor returns them: a `g4.Media` or its keywords)."""
        cfg = self.config
        media = Media.of(media, **media_kwargs)
        pixel_values, image_position_ids = media.pixel_values, media.image_position_ids
        pixel_values_videos, video_position_ids = media.pixel_values_videos, media.video_position_ids
        input_features, input_features_mask = media.input_features, media.input_features_mask
        input_ids = jnp.asarray(input_ids)
        image_mask = input_ids == cfg.image_token_id
        video_mask = input_ids == cfg.video_token_id
        audio_mask = input_ids == cfg.audio_token_id
        llm_ids = jnp.where(image_mask | video_mask | audio_mask, cfg.text.pad_token_id, input_ids)
        # transformers holds sqrt(hidden) as an fp32 buffer and casts it to the weight dtype (62.0 in bf16).
        scale = jnp.asarray(math.sqrt(cfg.text.hidden_size), jnp.float32).astype(self.dtype)
        h = self.embed_tokens(llm_ids) * scale
        if pixel_values is not None:
            if image_position_ids is None:
                raise ValueError("image_position_ids: required with pixel_values ((x, y) per patch, (-1, -1) = padding)")
            feats = self.get_image_features(pixel_values, image_position_ids)
            keep = jnp.all(jnp.asarray(image_position_ids) != -1, axis=-1)
            h = masked_scatter(h, image_mask, feats.reshape(-1, feats.shape[-1]), keep.reshape(-1), "images")
        if pixel_values_videos is not None:
            if video_position_ids is None:
                raise ValueError("video_position_ids: required with pixel_values_videos")
            feats = self.get_image_features(pixel_values_videos, video_position_ids)
            keep = jnp.all(jnp.asarray(video_position_ids) != -1, axis=-1)
            h = masked_scatter(h, video_mask, feats.reshape(-1, feats.shape[-1]), keep.reshape(-1), "video frames")
        if input_features is not None and input_features_mask is not None:  # transformers needs both
            if input_features_mask.shape != input_features.shape[:2]:
                raise ValueError(f"input_features_mask: expected shape {list(input_features.shape[:2])}, "
                                 f"found {list(input_features_mask.shape)}")
            feats = self.get_audio_features(input_features)
            keep = jnp.asarray(input_features_mask).astype(bool).reshape(-1)
            h = masked_scatter(h, audio_mask, feats.reshape(-1, feats.shape[-1]), keep, "audio")
        elif input_features is not None:
            raise ValueError("input_features_mask: required with input_features (True = real frame)")
        return h

    # ---- forward ---------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: Ints,
        *,
        positions: Ints | None = None,
        attention_mask: Mask | None = None,
        mm_token_type_ids: Ints | None = None,
        mask_mode: str = "intended",
        media: Media | None = None,
        **media_kwargs,
    ) -> Float[Array, "batch seq hidden"]:
        """Hidden states after the final norm."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq], found {list(input_ids.shape)}")
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s), (b, s)) if positions is None else jnp.asarray(positions)
        attention_mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        for name, x in (("positions", positions), ("attention_mask", attention_mask),
                        ("mm_token_type_ids", mm_token_type_ids)):
            if x is not None and x.shape != (b, s):
                raise ValueError(f"{name}: expected shape {[b, s]} like input_ids, found {list(x.shape)}")
        t = self.config.text
        blocks = None
        if mm_token_type_ids is not None and t.use_bidirectional_attention == "vision":
            blocks = block_sequence_ids(jnp.asarray(mm_token_type_ids))
        masks = attention_masks(attention_mask, t.sliding_window, blocks, mask_mode)

        h = self.embed(input_ids, media=media, **media_kwargs)
        rope = {}
        for layer_type in (SLIDING, FULL):
            g = t.layer_geometry_for_type(layer_type)
            rope[layer_type] = rope_cos_sin(positions, rope_inv_freq(g.rope, g.head_dim), h.dtype)
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            h = layer(h, cos, sin, masks[layer.layer_type])
        return self.norm(h)

    def logits(
        self,
        input_ids: Ints,
        *,
        positions: Ints | None = None,
        attention_mask: Mask | None = None,
        mm_token_type_ids: Ints | None = None,
        mask_mode: str = "intended",
        media: Media | None = None,
        **media_kwargs,
    ) -> Float[Array, "batch seq vocab"]:
        """Soft-capped logits of the tied lm head (no embedding scale), in the activation dtype."""
        h = self(input_ids, positions=positions, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                 mask_mode=mask_mode, media=media, **media_kwargs)
        logits = self.embed_tokens.attend(h)
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits
