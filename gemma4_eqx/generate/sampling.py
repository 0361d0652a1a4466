"""Choosing the next token from the logits, with every setting a traced value (one compiled program for all).

transformers' order: suppressed ids to -inf, temperature, top-k, top-p (nucleus), then a categorical draw with an
explicit key; `temperature == 0` is greedy (the argmax after suppression, top-k / top-p ignored). The settings
live in `SamplingParams`, a pytree of arrays, so a new temperature or top-k does not recompile anything: top-k
takes its threshold from one descending sort of the logits, top-p its cut from the cumulative probabilities of the
same sorted copy.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

NUM_TOP = 8  # how many of each step's largest log-probabilities a GenerationResult carries


class SamplingParams(eqx.Module):
    """Traced sampling settings. `top_k == 0` and `top_p == 1` disable those filters; `temperature == 0` is greedy.

    Shared by every row (scalars and `[vocab]` masks, `make`), or one setting per row (a leading `[rows]` axis on
    every field, `make_rows`: the continuous-batching engine, where each slot holds another request)."""

    temperature: Float[Array, "*rows"]
    top_k: Int[Array, "*rows"]
    top_p: Float[Array, "*rows"]
    suppress: Bool[Array, "*rows vocab"]  # True = never produced
    stop: Bool[Array, "*rows vocab"]  # True = ends the row
    pad_id: Int[Array, "*rows"]

    @property
    def per_row(self) -> bool:
        """Whether every field has a leading row axis (`make_rows`)."""
        return self.temperature.ndim == 1

    def is_stop(self, token: Int[Array, " batch"]) -> Bool[Array, " batch"]:
        """Whether each row's token ends that row (its own stop ids when the settings are per row)."""
        if self.per_row:
            return jnp.take_along_axis(self.stop, token[:, None], axis=1)[:, 0]
        return self.stop[token]

    @classmethod
    def make_rows(cls, vocab_size: int, rows: list[dict]) -> "SamplingParams":
        """One setting per row: `rows[i]` holds the keywords of `make` for row i (checked Python values)."""
        if not rows:
            raise ValueError("rows: expected the settings of at least one row")
        made = [cls.host_row(vocab_size, **row) for row in rows]
        put = jax.device_put  # transfers only: nothing compiled per call
        return cls(**{name: put(np.stack([m[name] for m in made])) for name in made[0]})

    @staticmethod
    def host_row(vocab_size: int, *, temperature: float, top_k: int | None, top_p: float | None, suppress_ids=(),
                 stop_ids=(), pad_id: int = 0) -> dict[str, np.ndarray | np.generic]:
        """One row's settings as numpy arrays, by field name (what `make` and `make_rows` transfer)."""
        suppress = np.zeros(vocab_size, bool)
        suppress[[i for i in suppress_ids if 0 <= i < vocab_size]] = True
        stop = np.zeros(vocab_size, bool)
        stop[list(stop_ids)] = True
        return {"temperature": np.float32(temperature), "top_k": np.int32(top_k or 0),
                "top_p": np.float32(1.0 if top_p is None else top_p), "suppress": suppress, "stop": stop,
                "pad_id": np.int32(pad_id)}

    @classmethod
    def make(cls, vocab_size: int, *, temperature: float, top_k: int | None, top_p: float | None,
             suppress_ids=(), stop_ids=(), pad_id: int = 0) -> "SamplingParams":
        """From checked Python values (see `settings.check_settings`); the masks are built with numpy."""
        row = cls.host_row(vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, suppress_ids=suppress_ids,
                           stop_ids=stop_ids, pad_id=pad_id)
        put = jax.device_put  # transfers only: nothing compiled per call
        return cls(**{name: put(value) for name, value in row.items()})


def top_k_mask(logits: Float[Array, " vocab"], k: int | Int[Array, ""]) -> Float[Array, " vocab"]:
    """Keep the k largest logits (ties with the k-th kept too, as transformers does), -inf elsewhere; k <= 0 or
    k >= vocab keeps everything. `k` may be traced."""
    return _filter(logits, jnp.asarray(k, jnp.int32), jnp.asarray(1.0, jnp.float32))


def top_p_mask(logits: Float[Array, " vocab"], p: float | Float[Array, ""]) -> Float[Array, " vocab"]:
    """Nucleus: drop the tokens whose cumulative probability, from the least likely up, stays <= 1 - p.

    The most likely token is always kept; `p >= 1` keeps everything. `p` may be traced.
    """
    return _filter(logits, jnp.asarray(0, jnp.int32), jnp.asarray(p, jnp.float32))


def _filter(logits: Float[Array, " vocab"], k: Int[Array, ""], p: Float[Array, ""]) -> Float[Array, " vocab"]:
    """top-k then top-p from one descending sort (the kept sets are prefixes of the sorted order)."""
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits)
    use_k = (k > 0) & (k < vocab)
    kth = desc[jnp.clip(k - 1, 0, vocab - 1)]
    logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
    desc = jnp.where(use_k & (desc < kth), -jnp.inf, desc)
    # transformers sums the ascending probabilities from the least likely; the same sums, read from the top
    probs_ascending = jax.nn.softmax(desc[::-1])
    tail = jnp.cumsum(probs_ascending)[::-1]  # tail[j]: probability of sorted entries j.. (least likely end)
    drop = tail <= 1.0 - p
    drop = drop.at[0].set(False)  # the most likely token stays
    n_kept = jnp.sum(~drop)
    cut = desc[n_kept - 1]
    return jnp.where((p < 1.0) & (logits < cut), -jnp.inf, logits)


def processed_logits(logits: Float[Array, " vocab"], params: SamplingParams) -> Float[Array, " vocab"]:
    """The distribution a sampled step draws from (fp32): suppressed, tempered, top-k and top-p filtered."""
    logits = jnp.where(params.suppress, -jnp.inf, logits.astype(jnp.float32))
    greedy = params.temperature == 0.0
    logits = logits / jnp.where(greedy, 1.0, params.temperature)
    # The sort behind top-k / top-p runs only when one of them filters (settings are traced: a cond, not a retrace).
    vocab = logits.shape[-1]
    filters = ((params.top_k > 0) & (params.top_k < vocab)) | (params.top_p < 1.0)
    return jax.lax.cond(filters, lambda x: _filter(x, params.top_k, params.top_p), lambda x: x, logits)


def ordered_log_softmax(logits: Float[Array, "*batch vocab"]) -> Float[Array, "*batch vocab"]:
    """`jax.nn.log_softmax` with the normalising sum added in one fixed order (128-lane vectors in vocabulary
    order, then the lanes in order), so a row's result does not depend on how many rows the call holds. XLA's own
    reduction does (on CPU, `log_softmax` of a [40, 1024] array differs from the same rows one at a time by up to
    4e-6). Used for the log-probs of a model in `numerics="invariant"`; apply it to a training forward's logits to
    compare them bit for bit."""
    logits = jax.lax.optimization_barrier(logits)  # fused into the soft cap, XLA would round the logits otherwise
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jax.lax.optimization_barrier(jnp.exp(shifted))
    lanes = 128
    n = -(-e.shape[-1] // lanes)
    e = jnp.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, n * lanes - e.shape[-1])])
    rows = jnp.moveaxis(e.reshape(*e.shape[:-1], n, lanes), -2, 0)
    acc, _ = jax.lax.scan(lambda a, r: (a + r, None), jnp.zeros_like(rows[0]), rows)
    total, _ = jax.lax.scan(lambda a, r: (a + r, None), jnp.zeros_like(acc[..., 0]), jnp.moveaxis(acc, -1, 0))
    return shifted - jax.lax.optimization_barrier(jnp.log(total))[..., None]


class Choice(eqx.Module):
    """One step's chosen token per row and what a GenerationResult reports about it."""

    token: Int[Array, " batch"]
    logprob: Float[Array, " batch"]  # log_softmax of the model's (soft-capped) logits at the chosen token
    sampling_logprob: Float[Array, " batch"]  # log-prob under the processed distribution actually sampled
    top_ids: Int[Array, "batch top"]
    top_logprobs: Float[Array, "batch top"]  # the model's largest log-probs (before any processing)


def choose(logits: Float[Array, "batch vocab"], key: PRNGKeyArray, params: SamplingParams, *,
           ordered: bool = False) -> Choice:
    """Sample (or take the argmax, at temperature 0) one token per row. `ordered`: the model's log-probs through
    `ordered_log_softmax` (for `numerics="invariant"`)."""
    return choose_rows(logits, jax.random.split(key, logits.shape[0]), params, ordered=ordered)


def choose_rows(logits: Float[Array, "batch vocab"], keys: Key[Array, " batch"], params: SamplingParams, *,
                ordered: bool = False) -> Choice:
    """`choose` with one key per row (`keys[i]` draws row i's token), and the settings shared or per row
    (`SamplingParams.make_rows`): what a row draws depends only on its own logits, key and settings."""
    if params.per_row:
        return _choose_per_row(logits, keys, params, ordered)

    def one(row, k):
        def greedy(row, k):
            token = jnp.argmax(jnp.where(params.suppress, -jnp.inf, row.astype(jnp.float32))).astype(jnp.int32)
            return token, jnp.zeros((), jnp.float32)

        def sampled(row, k):
            processed = processed_logits(row, params)
            token = jax.random.categorical(k, processed).astype(jnp.int32)
            return token, jax.nn.log_softmax(processed)[token].astype(jnp.float32)

        # Greedy steps skip the processed distribution (sort, draw) altogether: a cond on the traced temperature.
        token, sampling = jax.lax.cond(params.temperature == 0.0, greedy, sampled, row, k)
        logprobs = ordered_log_softmax(row) if ordered else jax.nn.log_softmax(row)
        top, ids = jax.lax.top_k(logprobs, min(NUM_TOP, row.shape[-1]))
        return token, logprobs[token], sampling, ids.astype(jnp.int32), top

    token, logprob, sampling, ids, top = jax.vmap(one)(logits, keys)
    return Choice(token, logprob, sampling.astype(jnp.float32), ids, top)


def _choose_per_row(logits: Float[Array, "batch vocab"], keys: Key[Array, " batch"], params: SamplingParams,
                    ordered: bool) -> Choice:
    """Each row with its own settings, computing what `choose` computes for that row alone. The conds of the
    shared case would become selects over rows (every row sorting its vocabulary on every step), so they are
    taken over the batch instead: the draw only when some row samples, the top-k / top-p sort only when some
    sampling row filters (a row that does not filter passes through `_filter` unchanged)."""
    vocab = logits.shape[-1]
    suppressed = jnp.where(params.suppress, -jnp.inf, logits.astype(jnp.float32))
    greedy_token = jnp.argmax(suppressed, axis=-1).astype(jnp.int32)
    greedy = params.temperature == 0.0

    def sampled(_):
        tempered = suppressed / jnp.where(greedy, 1.0, params.temperature)[:, None]
        filters = ((params.top_k > 0) & (params.top_k < vocab)) | (params.top_p < 1.0)
        processed = jax.lax.cond(jnp.any(filters & ~greedy), lambda x: jax.vmap(_filter)(x, params.top_k, params.top_p),
                                 lambda x: x, tempered)
        token = jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.vmap(jax.nn.log_softmax)(processed), token[:, None], axis=1)[:, 0]
        return jnp.where(greedy, greedy_token, token), jnp.where(greedy, 0.0, logp).astype(jnp.float32)

    token, sampling = jax.lax.cond(jnp.all(greedy), lambda _: (greedy_token, jnp.zeros(greedy.shape, jnp.float32)),
                                   sampled, None)
    logprobs = jax.vmap(ordered_log_softmax if ordered else jax.nn.log_softmax)(logits)
    top, ids = jax.vmap(lambda row: jax.lax.top_k(row, min(NUM_TOP, vocab)))(logprobs)
    picked = jnp.take_along_axis(logprobs, token[:, None], axis=1)[:, 0]
    return Choice(token, picked, sampling, ids.astype(jnp.int32), top)
