"""`g4.losses`: the losses in one place (the blocked cross-entropy, the next-token objective, packing).

The code lives in `cross_entropy` (blocked next-token cross-entropy that never builds `[seq, vocab]`),
`objectives` (which positions count, sequence and batch losses, perplexity) and `packing` (several sequences in
one row with `segment_ids`).
"""

from .cross_entropy import DEFAULT_BLOCK_SIZE, DEFAULT_VOCAB_BLOCK_SIZE, dense_next_token_nll, next_token_nll
from .objectives import batch_loss, sequence_loss, sequence_nll, target_mask, text_perplexity
from .packing import pack_sequences, packed_batch_loss, packed_hidden_states, packed_sequence_nll, segment_masks

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_VOCAB_BLOCK_SIZE", "batch_loss", "dense_next_token_nll", "next_token_nll",
           "pack_sequences", "packed_batch_loss", "packed_hidden_states", "packed_sequence_nll", "segment_masks",
           "sequence_loss", "sequence_nll", "target_mask", "text_perplexity"]
