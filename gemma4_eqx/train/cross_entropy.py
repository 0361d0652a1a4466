"""The next-token cross-entropy that scales to the 12B's vocabulary: blocked over rows and vocabulary.

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

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
    (`benchmarks/ce_memory.py` measures what that saves), but the embedding's gradient is summed over the row blocks in bf16 (3x the
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
