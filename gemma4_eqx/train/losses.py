"""Losses that scale: a blocked next-token cross-entropy, sequence packing, held-out perplexity.

Blocked cross-entropy. The dense loss multiplies the final hidden states by the tied embedding into `[seq, vocab]`
logits: at the 12B's vocabulary (262,144) and 8K tokens that is 8 GiB in fp32 before the backward pass keeps its
own copies. `next_token_nll` never builds it. It walks over blocks of rows (`lax.scan`) and, inside each, over
chunks of the vocabulary (another scan), keeping per row only a running maximum, a running sum of exponentials
and the target's logit (an online logsumexp). The final logit soft cap is applied to each chunk's logits, as
`Gemma4.logits_from_hidden` does to the whole. Both loop bodies are under `jax.checkpoint`, so the backward pass
recomputes a chunk's logits instead of keeping them: no logits temporary is larger than one `[block_size,
vocab_block_size]` tile (what remains is `[vocab, hidden]`-sized: the embedding's gradient). Same value and
gradients as the dense loss (to fp64 rounding: `tests/test_losses.py`). At the 12B's vocabulary and 8K tokens,
value and gradient need 24.0 GiB of temporaries dense and 5.1 GiB blocked with an fp32 embedding; 27.7 vs 12.1
GiB with a bf16 one (3.2 GiB with `accumulate_in_loss_dtype=False`): `benchmarks/ce_memory.py`.

Packing. `pack_sequences` lays several sequences end to end in rows of a fixed length with `segment_ids`
(1, 2, ... per sequence, 0 for padding) and positions that restart at 0 in every segment. `packed_sequence_nll`
runs the model with `segment_ids` (`Gemma4.__call__`: attention confined to each segment on top of the causal /
sliding-window / vision-block rules, positions restarting at each segment start) and drops the position that
would predict across a boundary (`train.target_mask`); the sum of a packed row's losses then equals the sum over
its sequences run one by one (`tests/test_packing.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..utils.checks import check_value
from ..model.masks import MaskMode, layer_masks, vision_block_ids, within_segments

DEFAULT_BLOCK_SIZE = 1024         # rows per block
DEFAULT_VOCAB_BLOCK_SIZE = 32768  # vocabulary entries per chunk (a 1024 x 32768 fp32 tile is 128 MiB)


# ---- the cross-entropy -------------------------------------------------------------------------------
def _soft_cap(logits: Float[Array, "rows chunk"], softcap: float | None) -> Float[Array, "rows chunk"]:
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def dense_next_token_nll(
    hidden: Float[Array, "seq hidden"],
    embedding: Float[Array, "vocab hidden"],
    targets: Int[Array, " seq"],
    *,
    softcap: float | None,
) -> Float[Array, " seq"]:
    """The reference: `-log softmax(softcap(hidden @ embedding.T))[targets]` per row, with the full logits."""
    logits = _soft_cap(jnp.matmul(hidden, embedding.T.astype(hidden.dtype)), softcap)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _chunk_stats(
    hidden: Float[Array, "rows hidden"],
    table: Float[Array, "chunk hidden"],
    start: Int[Array, ""] | int,
    targets: Int[Array, " rows"],
    softcap: float | None,
) -> tuple[Float[Array, " rows"], Float[Array, " rows"], Float[Array, " rows"]]:
    """(max, sum of exp(logit - max), the target's logit or 0 when it is not in this chunk) of one vocab chunk."""
    logits = _soft_cap(jnp.matmul(hidden, table.T.astype(hidden.dtype)), softcap)
    # The logsumexp does not depend on the shift, so the shift carries no gradient (and no NaN from -inf).
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    total = jnp.sum(jnp.exp(logits - top[:, None]), axis=-1)
    local = targets - start
    inside = (local >= 0) & (local < table.shape[0])
    hit = jnp.take_along_axis(logits, jnp.clip(local, 0, table.shape[0] - 1)[:, None], axis=-1)[:, 0]
    return top, total, jnp.where(inside, hit, 0.0)


def _merge(a, b):
    (ma, sa, pa), (mb, sb, pb) = a, b
    m = jnp.maximum(ma, mb)
    return m, sa * jnp.exp(ma - m) + sb * jnp.exp(mb - m), pa + pb


def _block_nll(
    hidden: Float[Array, "rows hidden"],
    targets: Int[Array, " rows"],
    embedding: Float[Array, "vocab hidden"],
    softcap: float | None,
    vocab_block_size: int,
) -> Float[Array, " rows"]:
    vocab, rows = embedding.shape[0], hidden.shape[0]
    n_full, tail = divmod(vocab, vocab_block_size)
    carry = (jnp.full((rows,), -jnp.inf, hidden.dtype), jnp.zeros((rows,), hidden.dtype),
             jnp.zeros((rows,), hidden.dtype))

    @jax.checkpoint  # the slice and its logits are recomputed in the backward pass, never stacked over chunks
    def chunk(carry, i):
        table = jax.lax.dynamic_slice_in_dim(embedding, i * vocab_block_size, vocab_block_size, axis=0)
        return _merge(carry, _chunk_stats(hidden, table, i * vocab_block_size, targets, softcap)), None

    if n_full:
        carry, _ = jax.lax.scan(chunk, carry, jnp.arange(n_full))
    if tail:
        start = n_full * vocab_block_size
        carry = _merge(carry, _chunk_stats(hidden, embedding[start:], start, targets, softcap))
    top, total, picked = carry
    return top + jnp.log(total) - picked


def next_token_nll(
    hidden: Float[Array, "seq hidden"],
    embedding: Float[Array, "vocab hidden"],
    targets: Int[Array, " seq"],
    *,
    softcap: float | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    vocab_block_size: int = DEFAULT_VOCAB_BLOCK_SIZE,
    accumulate_in_loss_dtype: bool = True,
) -> Float[Array, " seq"]:
    """Per-row cross-entropy of `targets` under the tied, soft-capped head, without the `[seq, vocab]` logits.

    `hidden`: final-norm hidden states (the rows that predict `targets`), in the dtype the loss is computed in.
    Equal to `dense_next_token_nll` up to rounding; the largest logits temporary is
    `[min(seq, block_size), min(vocab, vocab_block_size)]`, forward and backward.

    `accumulate_in_loss_dtype`: with an embedding narrower than `hidden` (bf16 weights, fp32 loss), cast it once
    to `hidden`'s dtype so its gradient is summed over row blocks in that dtype and rounded once, as the dense
    product does (default). False casts chunk by chunk instead: no `[vocab, hidden]` copy in the loss's dtype
    (at the 12B's vocabulary, 12.1 -> 3.2 GiB of temporaries for value and gradient at 8K tokens:
    `benchmarks/ce_memory.py`), but the embedding's gradient is summed over the row blocks in bf16 (3x the
    dense product's error with 4 blocks).
    """
    if block_size < 1 or vocab_block_size < 1:
        raise ValueError(f"block_size, vocab_block_size: expected positive sizes, found {block_size}, "
                         f"{vocab_block_size}")
    if hidden.shape[-1] != embedding.shape[-1]:
        raise ValueError(f"hidden: expected {embedding.shape[-1]} features (the embedding's), found "
                         f"{hidden.shape[-1]}")
    seq = hidden.shape[0]
    block = min(block_size, seq)
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    hb = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n_blocks, block, hidden.shape[-1])
    tb = jnp.pad(targets, (0, pad)).reshape(n_blocks, block)
    vocab_block = min(vocab_block_size, embedding.shape[0])
    if accumulate_in_loss_dtype:
        # Cast once, outside the loops: the embedding's gradient is then summed over row blocks in the loss's dtype
        # and rounded to the embedding's dtype once, as in the dense product.
        embedding = embedding.astype(hidden.dtype)

    @jax.checkpoint  # keep only each block's inputs; its vocab loop is rerun in the backward pass
    def body(carry, xs):
        h, t = xs
        return carry, _block_nll(h, t, embedding, softcap, vocab_block)

    _, nll = jax.lax.scan(body, None, (hb, tb))
    return nll.reshape(-1)[:seq]


# ---- perplexity -------------------------------------------------------------------------------------
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
    from .step import batch_loss

    return eqx.filter_jit(batch_loss)


# ---- packing ----------------------------------------------------------------------------------------
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
    from .step import sequence_nll

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

