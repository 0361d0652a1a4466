"""The Equinox Gemma 4 Unified model: embedding, multimodal splice, decoder stack, tied soft-capped logits.

One sequence per call (the Equinox convention); batch with `jax.vmap` / `eqx.filter_vmap`.
Spec: `decoder-and-checkpoint.md` §3 (decoder), §5 (masks), §6 (splice).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

ArrayLike = jax.Array | np.ndarray  # public entry points take numpy arrays (e.g. from the Processor) too

from ._checks import check_shape, check_value, is_concrete
from .config import Gemma4Config
from .embedders import AudioEmbedder, VisionEmbedder
from .layers.attention import Attention, check_implementation
from .layers.decoder import DecoderStack
from .layers.linear import Linear, rowwise_matmul
from .layers.mlp import MLP
from .layers.norm import RMSNorm
from .layers.numerics import check_numerics, warn_if_bf16_rounding_differs
from .masks import MaskMode, layer_masks, vision_block_ids


def _splice(
    embeds: Float[Array, "seq hidden"],
    slots: Bool[Array, " seq"],
    features: Float[Array, "items hidden"],
    valid: Bool[Array, " items"],
    what: str,
) -> Float[Array, "seq hidden"]:
    """Overwrite the placeholder rows, in order, with the valid feature rows, in order."""
    n_slots, n_valid = jnp.sum(slots), jnp.sum(valid)
    if is_concrete(n_slots, n_valid) and int(n_slots) != int(n_valid):
        raise ValueError(f"{what}: the sequence has {int(n_slots)} placeholder tokens but the inputs give "
                         f"{int(n_valid)} valid soft tokens; they must match")
    embeds = check_value(embeds, n_slots != n_valid,
                         lambda: f"{what}: the number of placeholder tokens differs from the number of valid "
                                 "soft tokens (call the model outside jit to see both counts)")
    order = jnp.nonzero(valid, size=valid.shape[0], fill_value=0)[0]
    rank = jnp.clip(jnp.cumsum(slots) - 1, 0, valid.shape[0] - 1)
    return jnp.where(slots[:, None], features[order[rank]].astype(embeds.dtype), embeds)


def _with_attention_implementation(tree, implementation: str):
    check_implementation(implementation)
    is_attention = lambda x: isinstance(x, Attention)
    return jax.tree.map(lambda x: x.with_implementation(implementation) if is_attention(x) else x, tree,
                        is_leaf=is_attention)


def _with_numerics(tree, numerics: str):
    check_numerics(numerics)
    # The composite modules switch their own parts; a Linear or RMSNorm elsewhere (embedders) is met alone.
    is_switchable = lambda x: isinstance(x, (RMSNorm, MLP, Attention, Linear))
    return jax.tree.map(lambda x: x.with_numerics(numerics) if is_switchable(x) else x, tree,
                        is_leaf=is_switchable)


class Gemma4(eqx.Module):
    """`Gemma4UnifiedForConditionalGeneration` as an immutable pytree."""

    embed_tokens: Float[Array, "vocab hidden"]
    layers: DecoderStack
    norm: RMSNorm
    embed_vision: VisionEmbedder | None
    embed_audio: AudioEmbedder | None
    config: Gemma4Config = eqx.field(static=True)

    def __init__(self, config: Gemma4Config, *, key: PRNGKeyArray, dtype=jnp.float32, remat: bool | str = False,
                 unroll: bool = False, attention_implementation: str = "xla", numerics: str = "xla"):
        ke, kl, kv, ka = jax.random.split(key, 4)
        t = config.text
        self.config = config
        self.embed_tokens = (t.initializer_range * jax.random.normal(ke, (t.vocab_size, t.hidden_size))).astype(dtype)
        self.layers = DecoderStack(t, key=kl, dtype=dtype, remat=remat, unroll=unroll)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype)
        self.embed_vision = None if config.vision is None else VisionEmbedder(config.vision, t, key=kv, dtype=dtype)
        self.embed_audio = None if config.audio is None else AudioEmbedder(config.audio, t, key=ka, dtype=dtype)
        if attention_implementation != "xla":
            self.layers = _with_attention_implementation(self.layers, attention_implementation)
        if check_numerics(numerics) != "xla":
            if numerics == "torch_cpu":
                warn_if_bf16_rounding_differs(dtype)
            self.layers, self.norm, self.embed_vision, self.embed_audio = _with_numerics(
                (self.layers, self.norm, self.embed_vision, self.embed_audio), numerics)

    def with_attention_implementation(self, implementation: str) -> "Gemma4":
        """The same model (same arrays) with every attention layer on another implementation.

        `"xla"` (default, rounds as transformers does), `"cudnn"` (cuDNN flash attention where it accepts the
        shape: bf16/f16, head_dim <= 256, i.e. the sliding layers; needs a GPU) or `"auto"` (cuDNN for GPU
        prefill, XLA otherwise). See `gemma4_eqx.layers.attention`.
        """
        return _with_attention_implementation(self, implementation)

    def with_numerics(self, numerics: str) -> "Gemma4":
        """The same model (same arrays) rounding as XLA chooses (`"xla"`, default), as transformers' CPU
        run does (`"torch_cpu"`: every RMSNorm sums in torch's order, the GELU rounds as torch's kernel), or the
        same way whatever the shape of the call (`"invariant"`: fixed-order sums, attention one key at a time).

        Both are for verification. `"torch_cpu"`: with `XLA_FLAGS=--xla_allow_excess_precision=false` the bf16
        logits of the test checkpoints equal transformers' bit for bit. `"invariant"`: cached decoding equals the
        no-cache forward bit for bit; needs attention implementation `"xla"`; slow for long contexts (the key loop
        is sequential). See `gemma4_eqx.layers.numerics`.
        """
        if check_numerics(numerics) == "torch_cpu":
            warn_if_bf16_rounding_differs(self.dtype)
        return _with_numerics(self, numerics)

    @property
    def dtype(self):
        return self.embed_tokens.dtype

    @property
    def numerics(self) -> str:
        """The numerics mode (`with_numerics`), as held by every switchable module; the final norm's is read."""
        return self.norm.numerics

    # ---- multimodal features ---------------------------------------------------------------------
    def image_features(
        self,
        pixel_values: Float[ArrayLike, "images patches patch_dim"],
        image_position_ids: Int[ArrayLike, "images patches 2"],
    ) -> Float[ArrayLike, "images patches hidden"]:
        """Soft tokens of every patch (padding patches included; drop rows whose position is (-1, -1))."""
        if self.embed_vision is None:
            raise ValueError("pixel_values: this model has no vision_config, so it cannot embed images")
        v = self.config.vision
        check_shape("pixel_values", pixel_values, (None, None, v.patch_dim),
                    f"(patch_dim = {v.model_patch_size}x{v.model_patch_size}x3)")
        check_shape("image_position_ids", image_position_ids, (pixel_values.shape[0], pixel_values.shape[1], 2))
        pixel_values, image_position_ids = jnp.asarray(pixel_values), jnp.asarray(image_position_ids)
        too_far = jnp.any(image_position_ids >= v.mm_posemb_size) | jnp.any(image_position_ids < -1)
        image_position_ids = check_value(
            image_position_ids, too_far,
            lambda: f"image_position_ids: coordinates must lie in [0, {v.mm_posemb_size}) (mm_posemb_size) or be -1 "
                    f"for padding; found values in [{int(np.min(np.asarray(image_position_ids)))}, "
                    f"{int(np.max(np.asarray(image_position_ids)))}]" if is_concrete(image_position_ids) else
                    f"image_position_ids: coordinates must lie in [0, {v.mm_posemb_size}) or be -1")
        return jax.vmap(self.embed_vision)(pixel_values, image_position_ids)

    def audio_features(
        self, input_features: Float[ArrayLike, "clips frames samples"]
    ) -> Float[ArrayLike, "clips frames hidden"]:
        """Soft tokens of every 640-sample frame (padding frames included)."""
        if self.embed_audio is None:
            raise ValueError("input_features: this model has no audio_config, so it cannot embed audio")
        size = self.config.audio.audio_embed_dim
        check_shape("input_features", input_features, (None, None, size), f"({size} samples per frame)")
        input_features = jnp.asarray(input_features)
        return jax.vmap(self.embed_audio)(input_features)

    # ---- embedding with the splice ---------------------------------------------------------------
    def embed(
        self,
        input_ids: Int[ArrayLike, " seq"],
        *,
        pixel_values: Float[ArrayLike, "images patches patch_dim"] | None = None,
        image_position_ids: Int[ArrayLike, "images patches 2"] | None = None,
        pixel_values_videos: Float[ArrayLike, "frames vpatches patch_dim"] | None = None,
        video_position_ids: Int[ArrayLike, "frames vpatches 2"] | None = None,
        input_features: Float[ArrayLike, "clips aframes samples"] | None = None,
        input_features_mask: Bool[ArrayLike, "clips aframes"] | None = None,
    ) -> Float[ArrayLike, "seq hidden"]:
        """Token embeddings times sqrt(hidden); placeholders embedded as pad, then overwritten by soft tokens."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        check_shape("input_ids", input_ids, (None,), "(one sequence; vmap for a batch)")
        is_image = input_ids == cfg.image_token_id
        is_video = input_ids == cfg.video_token_id
        is_audio = input_ids == cfg.audio_token_id
        ids = jnp.where(is_image | is_video | is_audio, cfg.text.pad_token_id, input_ids)
        # The scale is an fp32 constant cast to the weight dtype (62.0 in bf16), then a multiply in that dtype.
        scale = jnp.asarray(cfg.text.embed_scale, jnp.float32).astype(self.dtype)
        h = self.embed_tokens[ids] * scale
        if pixel_values is not None:
            if image_position_ids is None:
                raise ValueError("image_position_ids: required with pixel_values ((x, y) per patch, (-1, -1) = padding)")
            feats = self.image_features(pixel_values, image_position_ids)
            valid = jnp.all(jnp.asarray(image_position_ids) != -1, axis=-1)
            h = _splice(h, is_image, feats.reshape(-1, feats.shape[-1]), valid.reshape(-1), "images")
        if pixel_values_videos is not None:
            if video_position_ids is None:
                raise ValueError("video_position_ids: required with pixel_values_videos")
            feats = self.image_features(pixel_values_videos, video_position_ids)
            valid = jnp.all(jnp.asarray(video_position_ids) != -1, axis=-1)
            h = _splice(h, is_video, feats.reshape(-1, feats.shape[-1]), valid.reshape(-1), "video frames")
        if input_features is not None:
            if input_features_mask is None:
                raise ValueError("input_features_mask: required with input_features (True = real frame)")
            check_shape("input_features_mask", input_features_mask, input_features.shape[:2])
            input_features_mask = jnp.asarray(input_features_mask)
            feats = self.audio_features(input_features)
            h = _splice(h, is_audio, feats.reshape(-1, feats.shape[-1]), input_features_mask.reshape(-1), "audio")
        return h

    # ---- forward ---------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: Int[ArrayLike, " seq"],
        *,
        positions: Int[ArrayLike, " seq"] | None = None,
        attention_mask: Bool[ArrayLike, " seq"] | Int[ArrayLike, " seq"] | None = None,
        mm_token_type_ids: Int[ArrayLike, " seq"] | None = None,
        mask_mode: MaskMode = "intended",
        **media,
    ) -> Float[ArrayLike, "seq hidden"]:
        """Final-norm hidden states of every position."""
        h = self.embed(input_ids, **media)
        return self.norm(self.decode_hidden(h, positions=positions, attention_mask=attention_mask,
                                            mm_token_type_ids=mm_token_type_ids, mask_mode=mask_mode))

    def decode_hidden(
        self,
        h: Float[ArrayLike, "seq hidden"],
        *,
        positions: Int[ArrayLike, " seq"] | None = None,
        attention_mask: Bool[ArrayLike, " seq"] | Int[ArrayLike, " seq"] | None = None,
        mm_token_type_ids: Int[ArrayLike, " seq"] | None = None,
        mask_mode: MaskMode = "intended",
    ) -> Float[ArrayLike, "seq hidden"]:
        """Run the decoder stack over embeddings (before the final norm)."""
        seq = h.shape[0]
        slots = jnp.arange(seq)
        positions, valid, blocks = self.token_inputs(seq, positions, attention_mask, mm_token_type_ids, slots)
        window = self.config.text.sliding_window
        masks = layer_masks(slots, slots, valid, window, blocks, blocks, mask_mode)
        band = window if blocks is None else None  # text only: the sliding mask is a pure window
        return self.layers(h, positions, masks, band)

    def token_inputs(self, seq: int, positions, attention_mask, mm_token_type_ids, default_positions):
        """Checked per-token inputs: (positions, key validity, vision block ids or None)."""
        positions = default_positions if positions is None else jnp.asarray(positions)
        check_shape("positions", positions, (seq,))
        valid = jnp.ones((seq,), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        check_shape("attention_mask", valid, (seq,))
        blocks = None
        if mm_token_type_ids is not None and self.config.text.use_bidirectional_attention == "vision":
            check_shape("mm_token_type_ids", mm_token_type_ids, (seq,), "(one type per token)")
            blocks = vision_block_ids(jnp.asarray(mm_token_type_ids))
        return positions, valid, blocks

    def logits_from_hidden(self, h: Float[ArrayLike, "*seq hidden"]) -> Float[ArrayLike, "*seq vocab"]:
        """Tied lm head (no embedding scale) and the final soft cap, in the activation dtype."""
        head = self.embed_tokens.T.astype(h.dtype)
        if self.numerics == "invariant":
            # One row at a time, the transposed table materialised behind a barrier: with the transpose folded
            # into the dot, XLA picked another bf16 kernel when jit saw the weights as constants than as arguments
            # (the copy costs decode speed: see benchmarks/RESULTS.md).
            logits = rowwise_matmul(h, jax.lax.optimization_barrier(head))
        else:
            logits = jnp.matmul(h, head)
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(
        self,
        input_ids: Int[ArrayLike, " seq"],
        *,
        positions: Int[ArrayLike, " seq"] | None = None,
        attention_mask: Bool[ArrayLike, " seq"] | Int[ArrayLike, " seq"] | None = None,
        mm_token_type_ids: Int[ArrayLike, " seq"] | None = None,
        pixel_values: Float[ArrayLike, "images patches patch_dim"] | None = None,
        image_position_ids: Int[ArrayLike, "images patches 2"] | None = None,
        pixel_values_videos: Float[ArrayLike, "frames vpatches patch_dim"] | None = None,
        video_position_ids: Int[ArrayLike, "frames vpatches 2"] | None = None,
        input_features: Float[ArrayLike, "clips aframes samples"] | None = None,
        input_features_mask: Bool[ArrayLike, "clips aframes"] | None = None,
        mask_mode: MaskMode = "intended",
    ) -> Float[ArrayLike, "seq vocab"]:
        """Soft-capped logits for every position of one sequence."""
        h = self.hidden_states(
            input_ids, positions=positions, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
            mask_mode=mask_mode, pixel_values=pixel_values, image_position_ids=image_position_ids,
            pixel_values_videos=pixel_values_videos, video_position_ids=video_position_ids,
            input_features=input_features, input_features_mask=input_features_mask)
        return self.logits_from_hidden(h)


    # ---- cached generation (decode.py) -------------------------------------------------------------
    def prefill(self, input_ids: Int[ArrayLike, " seq"], cache, **kwargs):
        """Write a prompt (one sequence, media and `mm_token_type_ids` included) into `cache`.

        Returns `(logits of the last token, new cache)`; jit-compiled once per shape, the cache donated.
        """
        from .decode import prefill_jitted

        return prefill_jitted(self, input_ids, cache, **kwargs)

    def decode_step(self, token: Int[ArrayLike, ""], cache):
        """One new token at the cache's next slot: `(logits, new cache)`; jit-compiled, the cache donated."""
        from .decode import decode_step_jitted

        return decode_step_jitted(self, token, cache)


def count_parameters(model) -> int:
    """Number of array elements in a pytree of arrays or of `jax.ShapeDtypeStruct`s (from `filter_eval_shape`)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model) if hasattr(x, "shape") and hasattr(x, "dtype"))
