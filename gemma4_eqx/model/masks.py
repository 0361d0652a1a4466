"""Attention masks. One function per rule; every mask is boolean `[queries, keys]`, True = visible.

Indices are *cache slot* indices (the order tokens were written), not position ids; the two coincide without
left padding. Two modes for sequences with vision tokens:

- `"intended"` (default): full layers causal only; sliding layers
  `(causal OR same vision block) AND inside the window`.
- `"hf_forward"`: what transformers' bare `forward()` builds: full layers `causal OR block`;
  sliding layers `(causal AND window) OR block`.

Padding keys are never visible in either mode.
"""

from __future__ import annotations

import enum
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ..config import FULL, SLIDING
from ..utils.checks import check_value, is_concrete

MaskMode = Literal["intended", "hf_forward"]
MASK_MODES = ("intended", "hf_forward")

def vision_block_ids(mm_token_type_ids: Int[Array, " seq"]) -> Int[Array, " seq"]:
    """Each contiguous run of image/video soft tokens is one block (0, 1, 2, ...); everything else is -1.

    boi/eoi markers and timestamps are text (type 0), so every image and every video frame is its own block;
    audio (type 3) is never bidirectional.
    """
    is_vision = (mm_token_type_ids == TokenType.IMAGE) | (mm_token_type_ids == TokenType.VIDEO)
    prev = jnp.concatenate([jnp.zeros((1,), bool), is_vision[:-1]])
    starts = is_vision & ~prev
    return jnp.where(is_vision, jnp.cumsum(starts) - 1, -1)


def causal(q_slots: Int[Array, " q"], k_slots: Int[Array, " k"]) -> Bool[Array, "q k"]:
    return k_slots[None, :] <= q_slots[:, None]


def inside_window(q_slots: Int[Array, " q"], k_slots: Int[Array, " k"], window: int) -> Bool[Array, "q k"]:
    """A query sees exactly `window` keys counting itself: distance `q - k` in [0, window) on the past side.

    Only the past side is bounded (as in transformers), so future keys of a long vision block stay visible.
    """
    return k_slots[None, :] > q_slots[:, None] - window


def same_block(q_blocks: Int[Array, " q"], k_blocks: Int[Array, " k"]) -> Bool[Array, "q k"]:
    return (q_blocks[:, None] == k_blocks[None, :]) & (q_blocks[:, None] >= 0)


def layer_masks(
    q_slots: Int[Array, " q"],
    k_slots: Int[Array, " k"],
    key_valid: Bool[Array, " k"],
    sliding_window: int,
    q_blocks: Int[Array, " q"] | None = None,
    k_blocks: Int[Array, " k"] | None = None,
    mode: MaskMode = "intended",
) -> dict[str, Bool[Array, "q k"]]:
    """The mask of each layer type, keyed by `"sliding_attention"` / `"full_attention"`."""
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode: expected one of {MASK_MODES}, found {mode!r}")
    c = causal(q_slots, k_slots)
    w = inside_window(q_slots, k_slots, sliding_window)
    pad = key_valid[None, :]
    if q_blocks is None or k_blocks is None:
        return {FULL: c & pad, SLIDING: c & w & pad}
    b = same_block(q_blocks, k_blocks)
    if mode == "intended":
        return {FULL: c & pad, SLIDING: (c | b) & w & pad}
    return {FULL: (c | b) & pad, SLIDING: ((c & w) | b) & pad}


# ---- packed sequences (segment ids) -----------------------------------------------------------------------
def segment_starts(segment_ids: Int[Array, " seq"]) -> Int[Array, " seq"]:
    """Index of the first token of each token's segment (a segment is a run of equal ids)."""
    idx = jnp.arange(segment_ids.shape[0])
    first = jnp.concatenate([jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]])
    return jax.lax.cummax(jnp.where(first, idx, 0))


def segment_positions(segment_ids: Int[Array, " seq"]) -> Int[Array, " seq"]:
    """Positions restarting at 0 at every segment start: 0, 1, 2, 0, 1, ... for ids 1, 1, 1, 2, 2, ..."""
    return jnp.arange(segment_ids.shape[0]) - segment_starts(segment_ids)


def checked_segment_ids(segment_ids, seq: int) -> Int[Array, " seq"]:
    """`segment_ids` `[seq]` of an integer dtype, each id one contiguous run (an id may not come back after
    another one: 1 1 2 2 0 0 is fine, 1 2 1 is not). Raises naming the problem (eagerly, or when the compiled
    function runs)."""
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (seq,):
        raise ValueError(f"segment_ids: expected shape [{seq}] (one id per token), found {list(segment_ids.shape)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer dtype, found {segment_ids.dtype}")
    # first occurrence of each token's id vs the start of its run: they differ iff the id came back
    first_seen = jnp.argmax(segment_ids[:, None] == segment_ids[None, :], axis=-1)
    broken = jnp.any(first_seen != segment_starts(segment_ids))
    return check_value(
        segment_ids, broken,
        lambda: "segment_ids: each segment must be one contiguous run of tokens; found id "
                f"{int(segment_ids[int(np.argmax(np.asarray(first_seen != segment_starts(segment_ids))))])} "
                "again after another id" if is_concrete(segment_ids) else
                "segment_ids: each segment must be one contiguous run of tokens (an id came back after another)")


def within_segments(
    masks: dict[str, Bool[Array, "q k"]], q_segments: Int[Array, " q"], k_segments: Int[Array, " k"]
) -> dict[str, Bool[Array, "q k"]]:
    """Every layer type's mask AND same segment: no token sees another segment (vision blocks included)."""
    same = q_segments[:, None] == k_segments[None, :]
    return {kind: m & same for kind, m in masks.items()}


class TokenType(enum.IntEnum):
    """`mm_token_type_ids` values: what each token of a sequence is."""

    TEXT = 0  # text, the image/audio delimiters and video timestamps included
    IMAGE = 1  # an image soft token (placeholder)
    VIDEO = 2  # a video-frame soft token
    AUDIO = 3  # an audio soft token


def token_types(input_ids: Int[Array, " seq"], config) -> Int[Array, " seq"]:
    """`mm_token_type_ids` as the processor builds them: placeholder ids of each modality, 0 elsewhere."""
    types = jnp.zeros(input_ids.shape, jnp.int32)
    for kind, token_id in ((TokenType.IMAGE, config.image_token_id), (TokenType.VIDEO, config.video_token_id),
                           (TokenType.AUDIO, config.audio_token_id)):
        types = jnp.where(input_ids == token_id, int(kind), types)
    return types
