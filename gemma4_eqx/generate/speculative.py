"""Speculative decoding: `g4.generate(model, ..., assistant=drafter, num_draft_tokens=k)`.

Each round, for every row: the drafter proposes k tokens after the row's pending token (the last chosen token,
whose key is not yet in the target's cache); the target runs once over [pending, d1..dk] with its KV cache, which
gives its distribution after each prefix; the longest acceptable prefix d1..dn is kept together with one token of
the target's own (the correction at the first rejection, or a bonus token after all k), so a round yields n + 1
tokens for one target call; the cache is rolled back past the rejected drafts with `KVCache.truncate` (the ring
of the sliding layers included: the cache is made with `spare = k + 1` ring slots, which also keeps the
`window + 1` sliding keys the assistant reads).

Acceptance is the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): with p the target's
processed distribution (suppressed ids, temperature, top-k, top-p, exactly as `g4.generate` samples) and q the
distribution the draft was drawn from, d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first
rejection the replacement is drawn from max(0, p - q) renormalised; after k acceptances a bonus token is drawn from
p. The output then has the target's distribution. Greedy decoding (temperature 0) is the same rule with one-hot p
and q: a draft is kept exactly when it is the target's argmax, so the tokens equal the target's greedy tokens.

Drafters (the `assistant=` argument, `model.drafter.AbstractDrafter`):
- `g4.Assistant` (the Gemma 4 MTP drafter, `model.assistant`): k steps from the target's hidden state and KV;
  drafts drawn from its own processed distribution (argmax when greedy).
- `PromptLookupDrafter(ngram=n)`: the continuation of the latest earlier occurrence of the context's last n (then
  n - 1, ..., 1) tokens; q is one-hot at the proposal.

Compiled once per (prompt bucket, cache bucket, batch, k, drafter): prefill and the whole draft-verify loop are one
jitted program (`lax.while_loop` until every row is done); `max_new_tokens` and the sampling settings are traced.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..model.cache import KVCache
from ..model.decode import forward_with_cache
from ..model.drafter import AbstractDrafter, PromptLookupDrafter
from .batching import TOKEN_FIELDS
from .loop import prefill_row
from .sampling import SamplingParams, choose, processed_logits
from .settings import check_num_draft_tokens


class SpecState(eqx.Module):
    cache: KVCache  # per row (vmapped): every token before the pending one
    token: Int[Array, " batch"]  # the pending token
    hidden: Float[Array, "batch hidden"]  # the target's final-norm state that chose it
    history: Int[Array, "batch buf"]  # every token by slot, the pending one included (prompt lookup)
    out: Int[Array, "batch buf"]  # new tokens (the first is the prefill's)
    count: Int[Array, " batch"]
    done: Bool[Array, " batch"]
    accepted: Int[Array, " batch"]  # drafts accepted, summed over rounds
    calls: Int[Array, " batch"]  # verify calls
    key: PRNGKeyArray


def _target_probs(logits: Float[Array, "n vocab"], params: SamplingParams) -> Float[Array, "n vocab"]:
    """The distribution the target samples from: one-hot at the (suppressed) argmax when greedy."""
    def one(row):
        greedy = jax.nn.one_hot(jnp.argmax(jnp.where(params.suppress, -jnp.inf, row.astype(jnp.float32))),
                                row.shape[-1], dtype=jnp.float32)
        return jnp.where(params.temperature == 0.0, greedy, jax.nn.softmax(processed_logits(row, params)))
    return jax.vmap(one)(logits)


def _draft_one(model, drafter, params: SamplingParams, cache: KVCache, token, hidden, history, steps: int, key):
    """(draft tokens [k], q [k, vocab]: the distribution each was drawn from) for one row."""
    def pick(logits, k):
        probs = _target_probs(logits[None], params)[0]
        return jax.random.categorical(k, jnp.log(probs)).astype(jnp.int32)

    tokens, logits = drafter.propose_drafts(model, cache, token, hidden, history, steps, key=key, choose=pick)
    if logits is None:  # a deterministic proposal: q is one-hot at it
        return tokens, jax.nn.one_hot(tokens, model.config.text.vocab_size, dtype=jnp.float32)
    return tokens, _target_probs(logits, params)


def _verify_one(p: Float[Array, "k1 vocab"], q: Float[Array, "k vocab"], drafts: Int[Array, " k"], key):
    """(n accepted, the target's extra token) by the rejection rule."""
    k = drafts.shape[0]
    ku, kr = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:k], drafts[:, None], 1)[:, 0]
    q_d = jnp.take_along_axis(q, drafts[:, None], 1)[:, 0]
    u = jax.random.uniform(ku, (k,))
    ok = u * q_d < p_d  # u < p/q, without dividing by a zero q
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    q_n = jnp.where(n < k, q[jnp.minimum(n, k - 1)], 0.0)  # after k acceptances: the bonus from p itself
    residual = jnp.maximum(p[n] - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[n])
    extra = jax.random.categorical(kr, jnp.log(residual)).astype(jnp.int32)
    return n.astype(jnp.int32), extra


def _round(model, drafter, params: SamplingParams, max_new, steps: int, s: SpecState) -> SpecState:
    b = s.token.shape[0]
    key, kd, kv = jax.random.split(s.key, 3)
    drafts, q = jax.vmap(lambda c, t, h, hist, kk: _draft_one(model, drafter, params, c, t, h, hist, steps, kk))(
        s.cache, s.token, s.hidden, s.history, jax.random.split(kd, b))
    chunk = jnp.concatenate([s.token[:, None], drafts], 1)  # [b, k + 1]
    start = s.cache.length

    def verify(cache, ids):
        h, cache = forward_with_cache(model, ids, cache, validate=False)
        return h, model.logits_from_hidden(h), cache

    h, logits, cache = jax.vmap(verify)(s.cache, chunk)
    p = jax.vmap(lambda l: _target_probs(l, params))(logits)
    n, extra = jax.vmap(_verify_one)(p, q, drafts, jax.random.split(kv, b))
    live = ~s.done
    # the round's tokens: d1..dn, then the extra one; cut at a stop id and at max_new
    emitted = jnp.where(jnp.arange(steps + 1)[None] < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], 1),
                        extra[:, None])
    produced = n + 1
    stops = params.stop[emitted] & (jnp.arange(steps + 1)[None] < produced[:, None])
    first_stop = jnp.where(stops.any(1), jnp.argmax(stops, 1) + 1, produced)
    take = jnp.minimum(jnp.minimum(produced, first_stop), max_new - s.count)
    take = jnp.where(live, take, 0)
    emitted = jnp.where(jnp.arange(steps + 1)[None] < take[:, None], emitted, params.pad_id)
    write = lambda buf, vals, at: jax.lax.dynamic_update_slice_in_dim(buf, vals.astype(buf.dtype), at, 0)
    out = jax.vmap(write)(s.out, emitted, s.count)
    history = jax.vmap(write)(s.history, jnp.concatenate([drafts, drafts[:, :1]], 1), start + 1)
    history = jax.vmap(lambda hist, at, tok: hist.at[at].set(tok))(history, start + 1 + n, extra)
    count = s.count + take
    done = s.done | (live & (stops.any(1) | (count >= max_new)))
    keep = jnp.where(live, start + 1 + n, start)  # pending token + accepted drafts (a finished row: unchanged)
    cache = jax.vmap(lambda c, length: c.truncate(length))(cache, keep)
    hidden = jnp.take_along_axis(h, n[:, None, None], 1)[:, 0]
    return SpecState(cache=cache, token=jnp.where(live, extra, s.token),
                     hidden=jnp.where(live[:, None], hidden, s.hidden), history=history, out=out, count=count,
                     done=done, accepted=s.accepted + jnp.where(live, n, 0),
                     calls=s.calls + live.astype(jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("chunk", "bounds", "max_len", "steps", "mask_mode", "cache_dtype",
                                             "raw_keys"))
def _speculative(model, drafter, batch, n_chunks, max_new, key, params, *, chunk, bounds, max_len, steps,
                 mask_mode, cache_dtype, raw_keys):
    """Prefill every row, then draft-verify rounds until every row is done; one program."""
    tokens = {k: v for k, v in batch.items() if k in TOKEN_FIELDS}
    media = {k: v for k, v in batch.items() if k not in TOKEN_FIELDS}
    cfg = model.config
    buf = max_len + steps + 1

    def one(tokens, media):
        cache = KVCache.init(cfg, max_len=max_len, dtype=cache_dtype, raw_keys=raw_keys, spare=steps + 1)
        ids = tokens["input_ids"]
        cache, h = prefill_row(model, cache, tokens, media, n_chunks=n_chunks, chunk=chunk, bounds=bounds,
                               mask_mode=mask_mode)
        history = jnp.zeros((buf,), jnp.int32).at[:ids.shape[0]].set(ids.astype(jnp.int32))
        return model.logits_from_hidden(h), h, cache, history

    logits, hidden, cache, history = jax.vmap(one)(tokens, media)
    key, sub = jax.random.split(key)
    first = choose(logits, sub, params).token
    b = first.shape[0]
    history = jax.vmap(lambda hist, at, tok: hist.at[at].set(tok))(history, cache.length, first)
    out = jnp.full((b, buf), params.pad_id, jnp.int32).at[:, 0].set(first)
    count = jnp.ones((b,), jnp.int32)
    done = params.stop[first] | (count >= max_new)
    zeros = jnp.zeros((b,), jnp.int32)
    state = SpecState(cache, first, hidden, history, out, count, done, zeros, zeros, key)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                               lambda s: _round(model, drafter, params, max_new, steps, s), state)
    return state.out, state.count, state.accepted, state.calls


def speculative_decode(model, drafter, device_batch, *, p: int, chunk, bounds, max_len: int, max_new_tokens: int,
                       key, params: SamplingParams, num_draft_tokens: int, mask_mode, cache_dtype, raw_keys):
    """The generate() hook: (tokens [b, max_new], lengths [b], mean accepted drafts per target call)."""
    if not isinstance(drafter, AbstractDrafter):
        raise TypeError(f"assistant: expected a drafter (g4.Assistant, g4.PromptLookupDrafter or another "
                        f"model.drafter.AbstractDrafter), found {type(drafter).__name__}")
    num_draft_tokens = check_num_draft_tokens(num_draft_tokens)  # generate also checks it fits the context
    drafter.check_target(model)
    out, count, accepted, calls = _speculative(
        model, drafter, device_batch, np.int32(p // chunk if chunk else 0), np.int32(max_new_tokens), key, params,
        chunk=chunk, bounds=bounds, max_len=max_len, steps=int(num_draft_tokens), mask_mode=mask_mode,
        cache_dtype=cache_dtype, raw_keys=raw_keys)
    out, count = np.asarray(out)[:, :max_new_tokens], np.asarray(count)
    accepted, calls = np.asarray(accepted), np.asarray(calls)
    mean = float(accepted.sum() / max(calls.sum(), 1))
    return out, count.astype(np.int32), mean, int(calls.max()) if calls.size else 0


__all__ = ["PromptLookupDrafter", "speculative_decode"]
