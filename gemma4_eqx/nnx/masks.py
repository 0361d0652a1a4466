"""Batched boolean attention masks of the NNX reference (docs/spec/decoder-and-checkpoint.md §5), True = visible, `[batch, query, key]`.

Query and key indices are cache slots (0..S-1 over the row), not position ids. Vision blocks follow
transformers' `get_block_sequence_ids_for_mask`. Modes:

- `"intended"` (docs/spec/decoder-and-checkpoint.md §5.3): full `causal & pad`; sliding `(causal | block) & window & pad`.
- `"hf_forward"` (docs/spec/decoder-and-checkpoint.md §5.4, transformers' bare forward): full `(causal | block) & pad`;
  sliding `((causal & window) | block) & pad`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from ..config import FULL, SLIDING

MASK_MODES = ("intended", "hf_forward")


def block_sequence_ids(mm_token_type_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """A running id per contiguous run of image (1) or video (2) soft tokens; -1 for every other token."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    is_prev_vision = jnp.roll(is_vision, 1, axis=-1).at[:, 0].set(False)
    starts = is_vision & ~is_prev_vision
    return jnp.where(is_vision, jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1, -1)


def attention_masks(
    attention_mask: Bool[Array, "batch seq"],
    sliding_window: int,
    block_ids: Int[Array, "batch seq"] | None = None,
    mode: str = "intended",
) -> dict[str, Bool[Array, "batch seq seq"]]:
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode: expected one of {MASK_MODES}, found {mode!r}")
    seq = attention_mask.shape[1]
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    causal = (k <= q)[None]
    window = (k > q - sliding_window)[None]
    pad = attention_mask[:, None, :]
    if block_ids is None:
        return {FULL: causal & pad, SLIDING: causal & window & pad}
    block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    if mode == "intended":
        return {FULL: causal & pad, SLIDING: (causal | block) & window & pad}
    return {FULL: (causal | block) & pad, SLIDING: ((causal & window) | block) & pad}
