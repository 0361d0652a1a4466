"""Drafters for speculative decoding: what proposes the k tokens the target then verifies in one call.

`AbstractDrafter` is the interface the speculative loop (`generate.speculative`) calls; its implementations are
final: `model.assistant.Assistant` (the Gemma 4 MTP drafter, a network reading the target's KV cache and hidden
state) and `PromptLookupDrafter` (continuations copied from earlier in the context).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .cache import KVCache


class AbstractDrafter(eqx.Module):
    """Proposes draft tokens for one sequence; the speculative loop vmaps it over a batch."""

    @abc.abstractmethod
    def propose_drafts(
        self,
        target: eqx.Module,
        cache: KVCache,
        token: Int[Array, ""],
        hidden: Float[Array, " hidden"],
        history: Int[Array, " buf"],
        steps: int,
        *,
        key: PRNGKeyArray,
        choose: Callable[[Float[Array, " vocab"], PRNGKeyArray], Int[Array, ""]],
    ) -> tuple[Int[Array, " steps"], Float[Array, "steps vocab"] | None]:
        """`steps` tokens after `token` (the last chosen token: not yet in `cache`, predicted by the target from
        `hidden`, its final-norm state); `history[:cache.length + 1]` is the context by slot, `token` included.
        `choose(logits, key)` draws one token from the drafter's logits as the target would sample. Returns the
        tokens and the logits each was drawn from, or None for a deterministic proposal (one-hot)."""

    def check_target(self, target: eqx.Module) -> None:
        """Raise `ValueError` naming the field when this drafter cannot serve `target` (default: any target)."""


class PromptLookupDrafter(AbstractDrafter):
    """Prompt-lookup decoding: propose the tokens that followed the latest earlier occurrence of the context's
    last `ngram` tokens (falling back to shorter n-grams; without any match, the pending token repeated)."""

    ngram: int = eqx.field(static=True, default=3)

    def __post_init__(self):
        if not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"ngram: expected a positive integer, found {self.ngram!r}")

    def propose(self, history: Int[Array, " buf"], end: Int[Array, ""], steps: int) -> Int[Array, " steps"]:
        """`history[:end + 1]` is the context, `history[end]` the pending token."""
        buf = history.shape[0]
        idx = jnp.arange(buf)
        best = jnp.full((), -1, jnp.int32)
        for n in range(self.ngram, 0, -1):  # longest n-gram first
            match = (idx >= n - 1) & (idx < end)
            for i in range(n):
                shifted = jnp.roll(history, i)  # shifted[j] = history[j - i]
                match &= shifted == history[jnp.maximum(end - i, 0)]
            latest = jnp.max(jnp.where(match, idx, -1))
            best = jnp.where((best < 0) & (latest >= 0) & (end >= n - 1), latest, best)
        picks = best + 1 + jnp.arange(steps)
        known = (best >= 0) & (picks <= end)
        return jnp.where(known, history[jnp.clip(picks, 0, buf - 1)], history[end]).astype(jnp.int32)

    def propose_drafts(self, target, cache, token, hidden, history, steps, *, key, choose):
        return self.propose(history, cache.length, steps), None
