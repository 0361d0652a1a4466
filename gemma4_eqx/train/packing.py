"""Packing. `pack_sequences` lays several sequences end to end in rows of a fixed length with `segment_ids`
(1, 2, ... per sequence, 0 for padding) and positions that restart at 0 in every segment. `packed_sequence_nll`
runs the model with `segment_ids` (`Gemma4.__call__`: attention confined to each segment on top of the causal /
sliding-window / vision-block rules, positions restarting at each segment start) and drops the position that
would predict across a boundary (`train.target_mask`); the sum of a packed row's losses then equals the sum over
its sequences run one by one (`tests/test_packing.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..model.masks import MaskMode, layer_masks, vision_block_ids, within_segments
from ..utils.checks import check_value
from .objectives import sequence_nll


def pack_sequences(
    sequences: Sequence[Sequence[int] | np.ndarray],
    length: int,
    *,
    pad_id: int = 0,
    extras: Sequence[dict[str, np.ndarray]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Greedily lay `sequences` end to end, in order, in rows of `length` tokens.

    Each row is a dict: `input_ids` `[length]`, `segment_ids` (1, 2, ... for the row's sequences, 0 for padding),
    `positions` (restarting at 0 in every segment), `attention_mask` (False on padding), and, when `extras` gives
    per-sequence arrays (e.g. `mm_token_type_ids` `[len]`, or media such as `pixel_values` `[images, ...]`):
    token-aligned ones (same length as the sequence) packed like `input_ids` (padding 0), others concatenated
    along their first axis in the row's order, so soft tokens are spliced into their own segment.
    A sequence longer than `length` is an error (cut it first): packing never splits a sequence.
    """
    if extras is not None and len(extras) != len(sequences):
        raise ValueError(f"extras: expected one dict per sequence ({len(sequences)}), found {len(extras)}")
    rows: list[list[int]] = []
    for i, s in enumerate(sequences):
        n = len(s)
        if n == 0 or n > length:
            raise ValueError(f"sequences[{i}]: length {n}; packing needs 1 <= length <= {length} (the row length)")
        if rows and sum(len(sequences[j]) for j in rows[-1]) + n <= length:
            rows[-1].append(i)
        else:
            rows.append([i])
    out = []
    for members in rows:
        ids = np.full((length,), pad_id, np.int32)
        seg = np.zeros((length,), np.int32)
        pos = np.zeros((length,), np.int32)
        row: dict[str, Any] = {}
        at = 0
        for k, i in enumerate(members):
            s = np.asarray(sequences[i], np.int32)
            ids[at:at + len(s)], seg[at:at + len(s)], pos[at:at + len(s)] = s, k + 1, np.arange(len(s))
            for name, value in (extras[i] if extras is not None else {}).items():
                value = np.asarray(value)
                if value.ndim == 1 and value.shape[0] == len(s):  # token-aligned
                    row.setdefault(name, np.zeros((length,), value.dtype))[at:at + len(s)] = value
                else:
                    row.setdefault(name, []).append(value)
            at += len(s)
        row = {name: (np.concatenate(v) if isinstance(v, list) else v) for name, v in row.items()}
        out.append({"input_ids": ids, "segment_ids": seg, "positions": pos, "attention_mask": seg > 0, **row})
    return out


def segment_masks(
    segment_ids: Int[Array, " seq"],
    sliding_window: int,
    mm_token_type_ids: Int[Array, " seq"] | None = None,
    mode: MaskMode = "intended",
) -> dict[str, Bool[Array, "seq seq"]]:
    """Each layer type's mask for a packed row, as the model builds it from `segment_ids`: the model's rule
    (causal, window, vision blocks, padding keys = segment 0) AND same segment (`masks.within_segments`). Slots
    are row indices, so the window counts tokens of the row, which within one segment are the segment's own."""
    slots = jnp.arange(segment_ids.shape[0])
    blocks = None if mm_token_type_ids is None else vision_block_ids(mm_token_type_ids)
    masks = layer_masks(slots, slots, segment_ids > 0, sliding_window, blocks, blocks, mode)
    return within_segments(masks, segment_ids, segment_ids)


def packed_hidden_states(
    model,
    input_ids: Int[Array, " seq"],
    segment_ids: Int[Array, " seq"],
    *,
    positions: Int[Array, " seq"] | None = None,
    mm_token_type_ids: Int[Array, " seq"] | None = None,
    mask_mode: MaskMode = "intended",
    **media,
) -> Float[Array, "seq hidden"]:
    """`model.hidden_states` of a packed row (no token attends outside its segment; segment 0 is padding, which no
    token attends to). `positions` default to restarting at every segment start. The same as
    `model.hidden_states(input_ids, segment_ids=segment_ids, attention_mask=segment_ids > 0, ...)`."""
    return model.hidden_states(input_ids, segment_ids=segment_ids, attention_mask=segment_ids > 0,
                               positions=positions, mm_token_type_ids=mm_token_type_ids, mask_mode=mask_mode,
                               **media)


def packed_sequence_nll(
    model,
    input_ids: Int[Array, " seq"],
    segment_ids: Int[Array, " seq"],
    *,
    positions: Int[Array, " seq"] | None = None,
    loss_mask: Bool[Array, " seq"] | None = None,
    mm_token_type_ids: Int[Array, " seq"] | None = None,
    mask_mode: MaskMode = "intended",
    attention_mask: Bool[Array, " seq"] | None = None,
    **media,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(summed next-token cross-entropy, count) of a packed row: `g4.train.sequence_nll` with `segment_ids`, and
    segment 0 as padding. `attention_mask` (from `pack_sequences`) is implied by `segment_ids > 0` and accepted
    for convenience (it must agree)."""
    real = segment_ids > 0
    if attention_mask is not None:
        real = check_value(real, jnp.any(jnp.asarray(attention_mask).astype(bool) != real),
                           lambda: "attention_mask: must equal segment_ids > 0 in a packed row (segment 0 is padding)")
    return sequence_nll(model, input_ids, segment_ids=segment_ids, attention_mask=real,
                        positions=positions, loss_mask=loss_mask, mm_token_type_ids=mm_token_type_ids,
                        mask_mode=mask_mode, **media)


def packed_batch_loss(model, batch: dict[str, Any], *, mask_mode: MaskMode = "intended") -> Float[Array, ""]:
    """Token-weighted mean over stacked packed rows (`pack_sequences` rows stacked on a leading axis; media
    without a batch axis are not supported here: pack rows with the same media shapes, or vmap yourself)."""

    def one(row):
        row = dict(row)
        return packed_sequence_nll(model, row.pop("input_ids"), row.pop("segment_ids"), mask_mode=mask_mode, **row)

    totals, counts = jax.vmap(one)(batch)
    return totals.sum() / jnp.maximum(counts.sum(), 1)
