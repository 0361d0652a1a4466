"""The Equinox Gemma 4 Unified model: embedding, multimodal splice, decoder stack, tied soft-capped logits.

One sequence per call (the Equinox convention); batch with `jax.vmap` / `eqx.filter_vmap`. Media arrays travel
as one `g4.Media` (or the same-named keywords).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import Gemma4Config
from ..layers.decoder import DecoderStack
from ..layers.norm import RMSNorm
from ..layers.policy import Numerics, Remat, as_kernel, as_numerics, as_remat, with_policy
from ..utils.checks import check_shape, check_value, is_concrete
from .cache import KVCache
from .decode import decode_step_jitted, prefill_jitted
from .embedders import AudioEmbedder, VisionEmbedder
from .masks import (
    MaskMode,
    TokenType,
    checked_segment_ids,
    layer_masks,
    segment_positions,
    token_types,
    vision_block_ids,
    within_segments,
)
from .media import InputArray, Media
from .taps import TapResult, Taps
from .taps import run as run_with_taps


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


class Gemma4(eqx.Module):
    """`Gemma4UnifiedForConditionalGeneration` as an immutable pytree."""

    embed_tokens: Float[Array, "vocab hidden"]
    layers: DecoderStack
    norm: RMSNorm
    embed_vision: VisionEmbedder | None
    embed_audio: AudioEmbedder | None
    config: Gemma4Config = eqx.field(static=True)

    def __init__(self, config: Gemma4Config, *, key: PRNGKeyArray, dtype=jnp.float32,
                 remat: bool | str | Remat = False, unroll: bool = False,
                 attention_implementation: str = "xla", numerics: str | Numerics = "xla"):
        ke, kl, kv, ka = jax.random.split(key, 4)
        t = config.text
        numerics, kernel = as_numerics(numerics), as_kernel(attention_implementation)
        kernel_refused = numerics.refuses_kernel(kernel)
        if kernel_refused is not None:
            raise ValueError(kernel_refused)
        numerics.check_dtype(dtype)
        self.config = config
        self.embed_tokens = (t.initializer_range * jax.random.normal(ke, (t.vocab_size, t.hidden_size))).astype(dtype)
        self.layers = DecoderStack.build(t, key=kl, dtype=dtype, remat=remat, unroll=unroll, numerics=numerics,
                                         kernel=kernel)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype, numerics=numerics)
        vision = None if config.vision is None else VisionEmbedder(config.vision, t, key=kv, dtype=dtype)
        audio = None if config.audio is None else AudioEmbedder(config.audio, t, key=ka, dtype=dtype)
        self.embed_vision, self.embed_audio = with_policy((vision, audio), numerics)

    # ---- policies (layers/policy.py) ---------------------------------------------------------------
    def with_attention_implementation(self, implementation: str) -> Gemma4:
        """The same model (same arrays) with every attention layer on another kernel.

        `"xla"` (default, rounds as transformers does), `"cudnn"` (cuDNN flash attention where it accepts the
        shape: bf16/f16, head_dim <= 256, i.e. the sliding layers; needs a GPU) or `"auto"` (cuDNN for GPU
        prefill, XLA otherwise). A thin alias of `g4.with_policy(model, g4.layers.policy.as_kernel(...))`.
        """
        return with_policy(self, as_kernel(implementation))

    def with_numerics(self, numerics: str | Numerics) -> Gemma4:
        """The same model (same arrays) rounding as XLA chooses (`"xla"`, default), as transformers' CPU
        run does (`"torch_cpu"`: every RMSNorm sums in torch's order, the GELU rounds as torch's kernel), or the
        same way whatever the shape of the call (`"invariant"`: fixed-order sums, attention one key at a time).

        Both are for verification. `"torch_cpu"`: with `XLA_FLAGS=--xla_allow_excess_precision=false` the bf16
        logits of the test checkpoints equal transformers' bit for bit. `"invariant"`: cached decoding equals the
        no-cache forward bit for bit; needs attention implementation `"xla"`; slow for long contexts (the key loop
        is sequential). A module that cannot honour a mode (e.g. `LinearAttention` under `"invariant"`) makes this
        raise `g4.PolicyError` naming it. A thin alias of `g4.with_policy(model, ...)`.
        """
        numerics = as_numerics(numerics)
        numerics.check_dtype(self.dtype)
        return with_policy(self, numerics)

    def with_remat(self, remat: bool | str | Remat) -> Gemma4:
        """The same model with each decoder layer rematerialised in the backward pass (True, False or a
        `jax.checkpoint_policies` name such as `"dots_saveable"`)."""
        return with_policy(self, as_remat(remat))

    @property
    def dtype(self):
        return self.embed_tokens.dtype

    @property
    def numerics(self) -> Numerics:
        """The numerics policy (`with_numerics`), as held by every layer; the final norm's is read."""
        return self.norm.numerics

    # ---- multimodal features ---------------------------------------------------------------------
    def image_features(
        self,
        pixel_values: Float[InputArray, "images patches patch_dim"],
        image_position_ids: Int[InputArray, "images patches 2"],
    ) -> Float[Array, "images patches hidden"]:
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
        self, input_features: Float[InputArray, "clips frames samples"]
    ) -> Float[Array, "clips frames hidden"]:
        """Soft tokens of every 640-sample frame (padding frames included)."""
        if self.embed_audio is None:
            raise ValueError("input_features: this model has no audio_config, so it cannot embed audio")
        size = self.config.audio.audio_embed_dim
        check_shape("input_features", input_features, (None, None, size), f"({size} samples per frame)")
        return jax.vmap(self.embed_audio)(jnp.asarray(input_features))

    # ---- embedding with the splice ---------------------------------------------------------------
    def embed(self, input_ids: Int[InputArray, " seq"], *, media: Media | None = None, validate: bool = True,
              **media_kwargs) -> Float[Array, "seq hidden"]:
        """Token embeddings times sqrt(hidden); placeholders embedded as pad, then overwritten by soft tokens.

        What `inputs_embeds=` of `model(...)`, `hidden_states`, `g4.generate` and `g4.score` stands for. With
        `validate` (the default; the per-token decode step skips it) token ids must lie in `[0, vocab)`, and
        every modality whose placeholders appear needs its media (checked eagerly, or with `eqx.error_if` under
        jit).
        """
        cfg = self.config
        media = Media.of(media, **media_kwargs)
        input_ids = jnp.asarray(input_ids)
        check_shape("input_ids", input_ids, (None,), "(one sequence; vmap for a batch)")
        vocab = cfg.text.vocab_size
        outside = jnp.any((input_ids < 0) | (input_ids >= vocab)) & validate
        input_ids = check_value(
            input_ids, outside,
            lambda: f"input_ids: token ids must lie in [0, {vocab}) (vocab_size); found values in "
                    f"[{int(np.min(np.asarray(input_ids)))}, {int(np.max(np.asarray(input_ids)))}]"
                    if is_concrete(input_ids) else f"input_ids: token ids must lie in [0, {vocab}) (vocab_size)")
        types = token_types(input_ids, cfg)
        ids = jnp.where(types != TokenType.TEXT, cfg.text.pad_token_id, input_ids)
        # The scale is an fp32 constant cast to the weight dtype (62.0 in bf16), then a multiply in that dtype.
        scale = jnp.asarray(cfg.text.embed_scale, jnp.float32).astype(self.dtype)
        h = self.embed_tokens[ids] * scale
        return self._splice_media(h, types, media, require=validate)

    def splice_media(self, inputs_embeds: Float[InputArray, "seq hidden"], input_ids: Int[InputArray, " seq"], *,
                     media: Media | None = None, **media_kwargs) -> Float[Array, "seq hidden"]:
        """`inputs_embeds` with the rows at `input_ids`' placeholder tokens overwritten, in order, by the media's
        soft tokens (as `embed` does); a modality whose media are not given keeps its rows as they are."""
        media = Media.of(media, **media_kwargs)
        h = self.checked_embeds("inputs_embeds", inputs_embeds)
        check_shape("input_ids", input_ids, (h.shape[0],), "(one id per row of inputs_embeds)")
        return self._splice_media(h, token_types(jnp.asarray(input_ids), self.config), media, require=None)

    def _splice_media(self, h: Float[Array, "seq hidden"], types: Int[Array, " seq"], media: Media, *,
                      require: bool | None) -> Float[Array, "seq hidden"]:
        """Splice the media's soft tokens into the rows `types` marks. `require` (a bool): a modality whose
        placeholders appear needs its media when true (`embed`'s `validate`); None: rows without media are kept."""
        splices = (
            (TokenType.IMAGE, media.pixel_values, media.image_position_ids, "images", "pixel_values"),
            (TokenType.VIDEO, media.pixel_values_videos, media.video_position_ids, "video frames",
             "pixel_values_videos"),
            (TokenType.AUDIO, media.input_features, media.input_features_mask, "audio", "input_features"),
        )
        for kind, values, where, what, name in splices:
            slots = types == kind
            if values is None:
                if require is not None:
                    h = check_value(h, jnp.any(slots) & require,
                                    lambda name=name, what=what: f"{name}: input_ids hold {what} placeholder tokens "
                                    "but no media was given for them (pass the processor's media arrays)")
                continue
            if kind == TokenType.AUDIO:
                check_shape("input_features_mask", where, values.shape[:2])
                feats, valid = self.audio_features(values), jnp.asarray(where)
            else:
                feats = self.image_features(values, where)
                valid = jnp.all(jnp.asarray(where) != -1, axis=-1)
            h = _splice(h, slots, feats.reshape(-1, feats.shape[-1]), valid.reshape(-1), what)
        return h

    def checked_embeds(self, name: str, h: Float[InputArray, "seq hidden"]) -> Float[Array, "seq hidden"]:
        """`h` as a JAX array, after checking it is `[seq, hidden_size]` in the model's activation dtype (static:
        raises before anything runs)."""
        hidden = self.config.text.hidden_size
        shape = tuple(np.shape(h))
        if len(shape) != 2 or shape[1] != hidden:
            seq = shape[0] if len(shape) == 2 else "seq"
            raise ValueError(f"{name}: expected shape [{seq}, {hidden}] (seq, hidden_size) for one sequence (vmap for "
                             f"a batch), found {list(shape)}")
        h = jnp.asarray(h)
        if h.dtype != self.dtype:
            raise ValueError(f"{name}: expected the model's activation dtype {jnp.dtype(self.dtype).name}, found "
                             f"{h.dtype} (cast with .astype(model.dtype))")
        return h

    def input_embeddings(self, input_ids: Int[InputArray, " seq"] | None,
                         inputs_embeds: Float[InputArray, "seq hidden"] | None, media: Media
                         ) -> tuple[Float[Array, "seq hidden"], Int[InputArray, " seq"] | None]:
        """(the decoder's input embeddings, the ids that give the token types or None) for `input_ids` and / or
        `inputs_embeds` (see `__call__`)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("input_ids, inputs_embeds: give input_ids, inputs_embeds or both")
            # Without media `embed` has refused placeholder ids, so the sequence is text: no token types to derive.
            return self.embed(input_ids, media=media), None if media.empty else input_ids
        h = self.checked_embeds("inputs_embeds", inputs_embeds)
        if input_ids is None:
            if not media.empty:
                raise ValueError(f"{', '.join(media.present())}: media with inputs_embeds need input_ids to say which "
                                 "rows are their placeholders (or splice them yourself: inputs_embeds = "
                                 "model.embed(input_ids, media=...))")
            return h, None
        check_shape("input_ids", input_ids, (h.shape[0],), "(one id per row of inputs_embeds)")
        if not media.empty:
            return self._splice_media(h, token_types(jnp.asarray(input_ids), self.config), media, require=None), \
                input_ids
        cfg = self.config
        if is_concrete(input_ids) and not np.isin(np.asarray(input_ids), (cfg.image_token_id, cfg.video_token_id,
                                                                          cfg.audio_token_id)).any():
            return h, None  # text: the same program as for input_ids alone
        return h, input_ids

    # ---- forward ---------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: Int[InputArray, " seq"] | None = None,
        *,
        inputs_embeds: Float[InputArray, "seq hidden"] | None = None,
        positions: Int[InputArray, " seq"] | None = None,
        attention_mask: Bool[InputArray, " seq"] | Int[InputArray, " seq"] | None = None,
        mm_token_type_ids: Int[InputArray, " seq"] | None = None,
        mask_mode: MaskMode = "intended",
        media: Media | None = None,
        segment_ids: Int[InputArray, " seq"] | None = None,
        taps: Taps | None = None,
        **media_kwargs,
    ) -> Float[Array, "seq hidden"] | tuple[Float[Array, "seq hidden"], TapResult]:
        """Hidden states of every position after the final norm `model.norm` (and what `taps` read, when given);
        `model.logits_from_hidden` of them are the logits. The keywords are documented on `__call__`."""
        media = Media.of(media, **media_kwargs)
        h, types_from = self.input_embeddings(input_ids, inputs_embeds, media)
        out = self.decode_hidden(h, positions=positions, attention_mask=attention_mask,
                                 mm_token_type_ids=mm_token_type_ids, mask_mode=mask_mode,
                                 input_ids=types_from, segment_ids=segment_ids, taps=taps)
        if taps is None:
            return self.norm(out)
        return self.norm(out[0]), out[1]

    def decode_hidden(
        self,
        h: Float[InputArray, "seq hidden"],
        *,
        positions: Int[InputArray, " seq"] | None = None,
        attention_mask: Bool[InputArray, " seq"] | Int[InputArray, " seq"] | None = None,
        mm_token_type_ids: Int[InputArray, " seq"] | None = None,
        mask_mode: MaskMode = "intended",
        input_ids: Int[InputArray, " seq"] | None = None,
        segment_ids: Int[InputArray, " seq"] | None = None,
        taps: Taps | None = None,
    ) -> Float[Array, "seq hidden"] | tuple[Float[Array, "seq hidden"], TapResult]:
        """Run the decoder stack over input embeddings `h` `[seq, hidden]` (what `model.embed` returns); returns
        the last layer's residual stream, *before* the final norm: `model.logits_from_hidden(model.norm(out))`
        are the logits (`model(...)` is `embed` -> `decode_hidden` -> `model.norm` -> `logits_from_hidden`).
        `input_ids`, when given, supply the token types if `mm_token_type_ids` is omitted (and are checked against
        it when both are given); without either the sequence is text. `segment_ids`, `taps`: see `__call__`."""
        hidden = self.config.text.hidden_size
        if np.ndim(h) != 2 or np.shape(h)[1] != hidden:
            seq = np.shape(h)[0] if np.ndim(h) == 2 else "seq"
            raise ValueError(f"decode_hidden: h: expected shape [{seq}, {hidden}] (seq, hidden_size), found "
                             f"{list(np.shape(h))}")
        seq = h.shape[0]
        slots = jnp.arange(seq)
        default_positions = slots
        if segment_ids is not None:
            segment_ids = checked_segment_ids(segment_ids, seq)
            default_positions = segment_positions(segment_ids)
        positions, valid, blocks = self.token_inputs(seq, positions, attention_mask, mm_token_type_ids,
                                                     default_positions, input_ids)
        window = self.config.text.sliding_window
        masks = layer_masks(slots, slots, valid, window, blocks, blocks, mask_mode)
        if segment_ids is not None:
            masks = within_segments(masks, segment_ids, segment_ids)
        # text only: the sliding mask lies inside a window band (segments only remove keys from it)
        band = window if blocks is None else None
        if taps is None:
            return self.layers(jnp.asarray(h), positions, masks, band)
        if taps.empty:
            return self.layers(jnp.asarray(h), positions, masks, band), TapResult(residual=None, attention=None)
        return run_with_taps(self.layers, jnp.asarray(h), positions, masks, band, taps)

    def token_inputs(self, seq: int, positions, attention_mask, mm_token_type_ids, default_positions,
                     input_ids=None) -> tuple[Int[Array, " seq"], Bool[Array, " seq"], Int[Array, " seq"] | None]:
        """Checked per-token inputs: (positions, key validity, vision block ids or None).

        Without `mm_token_type_ids` the token types follow from `input_ids` (placeholder ids); given both, they
        must agree.
        """
        positions = default_positions if positions is None else jnp.asarray(positions)
        check_shape("positions", positions, (seq,))
        valid = jnp.ones((seq,), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        check_shape("attention_mask", valid, (seq,))
        if mm_token_type_ids is not None:
            check_shape("mm_token_type_ids", mm_token_type_ids, (seq,), "(one type per token)")
            mm_token_type_ids = jnp.asarray(mm_token_type_ids)
        if input_ids is not None:
            derived = token_types(jnp.asarray(input_ids), self.config)
            if mm_token_type_ids is None:
                mm_token_type_ids = derived
            else:
                mm_token_type_ids = check_value(
                    mm_token_type_ids, jnp.any(mm_token_type_ids != derived),
                    lambda: "mm_token_type_ids: disagree with input_ids (expected 1 exactly at image placeholder "
                            "ids, 2 at video, 3 at audio, 0 elsewhere); omit them to derive them from the ids")
        blocks = None
        if mm_token_type_ids is not None and self.config.text.use_bidirectional_attention == "vision":
            blocks = vision_block_ids(mm_token_type_ids)
        return positions, valid, blocks

    def logits_from_hidden(self, h: Float[InputArray, "*seq hidden"]) -> Float[Array, "*seq vocab"]:
        """Tied lm head (no embedding scale) and the final soft cap, in the activation dtype. `h`: hidden states
        after the final norm (`hidden_states`, or `model.norm` of `decode_hidden`'s output or of a tapped
        residual)."""
        hidden = self.config.text.hidden_size
        if np.ndim(h) < 1 or np.shape(h)[-1] != hidden:
            raise ValueError(f"logits_from_hidden: h: expected shape [..., {hidden}] (hidden_size {hidden} last), "
                             f"found {list(np.shape(h))}")
        logits = self.numerics.tied_head(h, self.embed_tokens.astype(h.dtype))
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(
        self,
        input_ids: Int[InputArray, " seq"] | None = None,
        *,
        inputs_embeds: Float[InputArray, "seq hidden"] | None = None,
        positions: Int[InputArray, " seq"] | None = None,
        attention_mask: Bool[InputArray, " seq"] | Int[InputArray, " seq"] | None = None,
        mm_token_type_ids: Int[InputArray, " seq"] | None = None,
        mask_mode: MaskMode = "intended",
        media: Media | None = None,
        segment_ids: Int[InputArray, " seq"] | None = None,
        taps: Taps | None = None,
        **media_kwargs,
    ) -> Float[Array, "seq vocab"] | tuple[Float[Array, "seq vocab"], TapResult]:
        """Soft-capped logits for every position of one sequence: `logits_from_hidden` of `hidden_states` (same
        keywords; the signature is spelled out here as the public contract lists it). Media as `media=g4.Media(...)`
        or as the keywords `pixel_values`, `image_position_ids`, `pixel_values_videos`, `video_position_ids`,
        `input_features`, `input_features_mask`.

        `segment_ids` (packed sequences, e.g. from `g4.losses.pack_sequences`): one id per token, each segment a
        contiguous run; no token attends outside its segment (sliding and global layers, image blocks included),
        and without `positions` the positions restart at 0 at every segment start. Padding is still
        `attention_mask`'s job. The media's soft tokens fill the row's placeholders in order.

        `inputs_embeds` `[seq, hidden]` (transformers' name): the decoder's input embeddings, in place of
        embedding `input_ids`: what `model.embed(input_ids, media=...)` returns (token embeddings times
        sqrt(hidden), soft tokens spliced in), in the model's activation dtype; differentiable (saliency, soft
        prompts). `model(inputs_embeds=model.embed(ids))` equals `model(ids)` bit for bit. Given alone, the sequence
        is text unless `mm_token_type_ids` says where image / video tokens are (their bidirectional blocks), and
        media keywords are refused. Given with `input_ids` (same length), the ids do everything but the embedding:
        they give the token types (image blocks, checked against `mm_token_type_ids`), and the media's soft tokens
        overwrite the rows of their placeholders, in order, as for ids alone (rows of a modality whose media are
        not given are kept: they may hold the soft tokens already).

        `taps` (`g4.Taps`): read residuals / attention probabilities of chosen layers, patch (replace) or add to
        residuals (`gemma4_eqx/model/taps.py`); the call then returns `(logits, g4.TapResult)`. Without it the
        program is the same as before taps existed."""
        out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                                 attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                                 mask_mode=mask_mode, media=media, segment_ids=segment_ids, taps=taps, **media_kwargs)
        if taps is None:
            return self.logits_from_hidden(out)
        return self.logits_from_hidden(out[0]), out[1]

    # ---- cached generation (decode.py) -------------------------------------------------------------
    def prefill(self, input_ids: Int[InputArray, " seq"] | None, cache: KVCache, **kwargs
                ) -> tuple[Float[Array, " vocab"], KVCache] | tuple[Float[Array, " vocab"], KVCache, TapResult]:
        """Write a prompt (one sequence, media and `mm_token_type_ids` included) into `cache`.

        Returns `(logits of the last token, new cache)`; jit-compiled once per shape. The cache you pass stays
        valid (nothing is donated), so it can be kept as a snapshot. `inputs_embeds=` (with `input_ids` None)
        prefills given embeddings (`model.decode.forward_with_cache`). `taps=g4.Taps(...)`: read and write the
        residual stream of the prompt's tokens; returns `(logits, cache, g4.TapResult)` (attention over the
        cache's slots).
        """
        return prefill_jitted(self, input_ids, cache, **kwargs)

    def decode_step(self, token: Int[InputArray, ""], cache: KVCache, *, taps: Taps | None = None
                    ) -> tuple[Float[Array, " vocab"], KVCache] | tuple[Float[Array, " vocab"], KVCache, TapResult]:
        """One new token at the cache's next slot: `(logits, new cache)`; jit-compiled; the cache you pass stays
        valid. `taps`: as for `prefill` (values `[writes, hidden]` or `[writes, 1, hidden]`); returns
        `(logits, cache, g4.TapResult)` with reads of the one position."""
        if taps is None:
            return decode_step_jitted(self, token, cache)
        return decode_step_jitted(self, token, cache, taps)


def count_parameters(model) -> int:
    """Number of array elements in a pytree of arrays or of `jax.ShapeDtypeStruct`s (from `filter_eval_shape`)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model) if hasattr(x, "shape") and hasattr(x, "dtype"))
