"""The next-token objective: which positions count (`target_mask`), a sequence's and a batch's loss, perplexity.

Which positions count. Position `t` predicts token `t + 1` and is in the loss iff
- both `t` and `t + 1` are real tokens (`attention_mask`; a left pad predicting the first real token is out);
- token `t + 1` is not a multimodal soft token (an image, video or audio placeholder, by id or by a non-zero
  `mm_token_type_ids`): soft tokens are inputs, replaced by embedder outputs, and have no target. So the
  position *before* an image/audio block (`<|image>` / boi) does not predict into it, while the block's last soft
  token does predict the closing marker (`<image|>` / eoi), and text after it counts as usual;
- `loss_mask[t + 1]` is True when a `loss_mask` is given (True = "this token is a target": e.g. only the
  assistant's answer);
- tokens `t` and `t + 1` are in the same segment when `segment_ids` are given (packed sequences: the last token
  of one sequence does not predict the first of the next).
The loss is the mean cross-entropy over counted positions (over the whole batch for `batch_loss`: each token
weighs the same, whatever its sequence's length).
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..layers.numerics import compute_dtype
from ..model.masks import MaskMode, TokenType
from .cross_entropy import next_token_nll


def target_mask(
    input_ids: Int[Array, " seq"],
    config,
    *,
    attention_mask: Bool[Array, " seq"] | None = None,
    mm_token_type_ids: Int[Array, " seq"] | None = None,
    loss_mask: Bool[Array, " seq"] | None = None,
    segment_ids: Int[Array, " seq"] | None = None,
) -> Bool[Array, " seq-1"]:
    """Entry `t` says whether position `t` (predicting token `t + 1`) counts in the loss (see the module doc)."""
    real = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    soft = ((input_ids == config.image_token_id) | (input_ids == config.video_token_id)
            | (input_ids == config.audio_token_id))
    if mm_token_type_ids is not None:
        soft = soft | (mm_token_type_ids != TokenType.TEXT)
    target_ok = real & ~soft
    if loss_mask is not None:
        target_ok = target_ok & loss_mask.astype(bool)
    keep = real[:-1] & target_ok[1:]
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        keep = keep & (segment_ids[:-1] == segment_ids[1:])
    return keep


def sequence_nll(
    model, input_ids: Int[Array, " seq"], *, loss_mask: Bool[Array, " seq"] | None = None,
    mask_mode: MaskMode = "intended", **inputs
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum of the next-token cross-entropies over counted positions, their number) for one sequence.

    `inputs` are the keywords of `model(...)` (attention_mask, positions, mm_token_type_ids, segment_ids, media);
    with `segment_ids` (a packed row) no position predicts across a segment boundary.
    """
    h = model.hidden_states(input_ids, mask_mode=mask_mode, **inputs)
    h = h.astype(compute_dtype(h.dtype))
    if model.numerics.shape_invariant:
        # the lm head's own row-at-a-time product, so the loss's logits equal decoding's bit for bit
        logits = model.logits_from_hidden(h[:-1])
        picked = jnp.take_along_axis(logits, input_ids[1:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
    else:
        # blocked over rows and vocabulary: the [seq, vocab] logits are never built (gemma4_eqx/losses.py)
        nll = next_token_nll(h[:-1], model.embed_tokens, input_ids[1:],
                             softcap=model.config.text.final_logit_softcapping)
    mask = target_mask(input_ids, model.config, attention_mask=inputs.get("attention_mask"),
                       mm_token_type_ids=inputs.get("mm_token_type_ids"), loss_mask=loss_mask,
                       segment_ids=inputs.get("segment_ids"))
    nll = jnp.where(mask, nll, 0.0)
    return nll.sum(), mask.sum().astype(nll.dtype)


def sequence_loss(model, sample: dict[str, Any], *, mask_mode: MaskMode = "intended") -> Float[Array, ""]:
    """Mean next-token cross-entropy of one sequence (`sample`: `input_ids` and `model(...)` keywords)."""
    sample = dict(sample)
    total, count = sequence_nll(model, sample.pop("input_ids"), mask_mode=mask_mode, **sample)
    return total / jnp.maximum(count, 1)


def batch_loss(model, batch: dict[str, Any], *, mask_mode: MaskMode = "intended") -> Float[Array, ""]:
    """Token-weighted mean over a stacked batch (leading batch axis on every entry, e.g. from
    `g4.batching.stack_samples`), computed with `jax.vmap` over `sequence_nll`."""
    def one(sample):
        sample = dict(sample)
        return sequence_nll(model, sample.pop("input_ids"), mask_mode=mask_mode, **sample)

    totals, counts = jax.vmap(one)(batch)
    return totals.sum() / jnp.maximum(counts.sum(), 1)


# ---- model-wide switches ----------------------------------------------------------------------------


def text_perplexity(model, tokenizer, text: str, seq: int) -> Float[Array, ""]:
    """exp(mean next-token cross-entropy) of `text` cut into rows of `seq` tokens, each row `<bos>` + text.

    `tokenizer`: the processor's (`proc.tokenizer`); its encoding starts with `<bos>`. Every token of `text` is
    predicted once, from the rows' own context (a row restarts the context).
    """
    if seq < 2:
        raise ValueError(f"seq: expected at least 2 tokens per row, found {seq}")
    ids = np.asarray(tokenizer(text)["input_ids"])
    ids = (ids[0] if ids.ndim == 2 else ids).tolist()
    bos, body = ids[0], ids[1:]
    width = seq - 1
    n_rows = -(-len(body) // width)
    rows = np.full((n_rows, seq), model.config.text.pad_token_id, np.int32)
    mask = np.zeros((n_rows, seq), bool)
    for r in range(n_rows):
        piece = body[r * width:(r + 1) * width]
        rows[r, 0], rows[r, 1:1 + len(piece)] = bos, piece
        mask[r, :1 + len(piece)] = True
    loss = _jitted_batch_loss()(model, {"input_ids": jnp.asarray(rows), "attention_mask": jnp.asarray(mask)})
    return jnp.exp(loss)


@functools.cache
def _jitted_batch_loss():
    return eqx.filter_jit(batch_loss)
