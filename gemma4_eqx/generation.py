"""`g4.generate`: prefill once, then decode token by token from the KV cache.

Sampling follows transformers' order: suppressed ids to -inf, temperature, top-k, top-p (nucleus), then a
categorical draw with an explicit key; `temperature=0` is greedy. A row that produced a stop id is finished:
its later tokens are the pad id. Batches are left-padded prompts with an `attention_mask`; positions are
`cumsum(mask) - 1` (pads at 0), as transformers' `generate()` builds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .cache import KVCache
from .decode import decode_step, prefill, prefill_chunks

DEFAULT_STOP_IDS = (1, 106, 50)
DEFAULT_SUPPRESS_IDS = (258882, 258883)


# ---- logits processing -------------------------------------------------------------------------
def suppress(logits: Float[Array, "*b vocab"], ids: Sequence[int]) -> Float[Array, "*b vocab"]:
    ids = [i for i in ids if 0 <= i < logits.shape[-1]]
    return logits if not ids else logits.at[..., jnp.asarray(ids)].set(-jnp.inf)


def top_k_mask(logits: Float[Array, " vocab"], k: int) -> Float[Array, " vocab"]:
    """Keep the k largest logits (ties with the k-th kept too, as transformers does), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: Float[Array, " vocab"], p: float) -> Float[Array, " vocab"]:
    """Nucleus: drop the tokens whose cumulative probability, from the least likely up, stays <= 1 - p.

    The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(logits)  # ascending
    sorted_logits = logits[order]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits))
    drop_sorted = cum <= (1.0 - p)
    drop_sorted = drop_sorted.at[-1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def sample(logits: Float[Array, " vocab"], key: PRNGKeyArray, *, temperature: float, top_k: int | None,
           top_p: float | None) -> Int[Array, ""]:
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    return jax.random.categorical(key, logits).astype(jnp.int32)


# ---- the loop ----------------------------------------------------------------------------------
class _State(eqx.Module):
    cache: KVCache
    token: Int[Array, " batch"]
    done: Bool[Array, " batch"]
    key: PRNGKeyArray


def _pick(logits, key, done, *, temperature, top_k, top_p, suppress_ids, stop_ids, pad_id):
    logits = suppress(logits, suppress_ids)
    keys = jax.random.split(key, logits.shape[0])
    tok = jax.vmap(functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p))(logits, keys)
    tok = jnp.where(done, pad_id, tok)
    stop = jnp.isin(tok, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(done)
    return tok, done | stop


@functools.partial(jax.jit, static_argnames=("sampling", "mask_mode"), donate_argnames=("cache",))
def _prefill_batch(model, cache, key, batch, sampling, mask_mode):
    def one(c, b):
        ids = b.pop("input_ids", None)
        return prefill(model, ids, c, mask_mode=mask_mode, **b)

    logits, cache = jax.vmap(one)(cache, batch)
    key, sub = jax.random.split(key)
    done = jnp.zeros(logits.shape[0], bool)
    tok, done = _pick(logits, sub, done, **dict(sampling))
    return _State(cache, tok, done, key)


@jax.jit
def _embed_batch(model, batch):
    return jax.vmap(lambda b: model.embed(b.pop("input_ids"), **b))(batch)


@functools.partial(jax.jit, static_argnames=("sampling",), donate_argnames=("state",))
def _step(model, state: _State, sampling):
    logits, cache = jax.vmap(lambda c, t: decode_step(model, t, c))(state.cache, state.token)
    key, sub = jax.random.split(state.key)
    tok, done = _pick(logits, sub, state.done, **dict(sampling))
    return _State(cache, tok, done, key)


@functools.partial(jax.jit, static_argnames=("sampling", "steps"), donate_argnames=("state",))
def _steps(model, state: _State, sampling, steps: int):
    def body(state, _):
        state = _step.__wrapped__(model, state, sampling)
        return state, state.token
    return jax.lax.scan(body, state, None, length=steps)


def _chunked_prefill(model, cache, key, batch, sampling, mask_mode, chunk_size):
    """Prefill whole, or in chunks that never cut a vision block (the prompt is embedded once, then sliced)."""
    seq = batch["input_ids"].shape[1]
    frozen = tuple(sampling.items())
    if chunk_size is None or chunk_size >= seq:
        return _prefill_batch(model, cache, key, batch, frozen, mask_mode)
    types = batch.get("mm_token_type_ids")
    bounds = prefill_chunks(None if types is None else np.asarray(types), seq, chunk_size)
    token_fields = {k: v for k, v in batch.items() if k in ("attention_mask", "positions", "mm_token_type_ids")}
    media = {k: v for k, v in batch.items() if k not in token_fields and k != "input_ids"}
    embeds = _embed_batch(model, {"input_ids": batch["input_ids"], **media})
    state = None
    for start, end in bounds:
        part = {k: v[:, start:end] for k, v in token_fields.items()}
        part["inputs_embeds"] = embeds[:, start:end]
        state = _prefill_batch(model, cache if state is None else state.cache, key, part, frozen, mask_mode)
    return state


def generate(
    model,
    prompt_ids,
    *,
    max_new_tokens: int = 64,
    key: PRNGKeyArray | None = None,
    temperature: float = 1.0,
    top_k: int | None = 64,
    top_p: float | None = 0.95,
    stop_ids: Sequence[int] | None = DEFAULT_STOP_IDS,
    suppress_ids: Sequence[int] | None = DEFAULT_SUPPRESS_IDS,
    attention_mask=None,
    positions=None,
    pad_id: int | None = None,
    streamer: Callable[[np.ndarray], None] | None = None,
    cache_dtype=None,
    cache_raw_keys: bool = True,
    prefill_chunk_size: int | None = None,
    mask_mode: str = "intended",
    **media,
):
    """Generate up to `max_new_tokens` new tokens after `prompt_ids`; returns only the new tokens.

    `prompt_ids` 1-D (one prompt; media keywords as for `model(...)`) -> `[new]`, or 2-D left-padded with an
    `attention_mask` (media per row, stacked: see `g4.batching.stack_samples`) -> `[batch, new]`.
    `streamer(tokens)` receives each step's tokens (shape `[batch]`) as they are produced.
    `cache_raw_keys=False` keeps K and V of the keys-as-values layers in the cache instead of their raw keys
    (twice their memory, no per-step renormalisation of the context; see `g4.KVCache.init`).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive number, found {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), found {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], found {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("key: sampling (temperature > 0) needs an explicit jax.random key")
    key = jax.random.key(0) if key is None else key
    cfg = model.config
    pad_id = cfg.text.pad_token_id if pad_id is None else pad_id
    ids = jnp.asarray(prompt_ids, jnp.int32)
    single = ids.ndim == 1
    if single:
        ids = ids[None]
        media = {k: None if v is None else jnp.asarray(v)[None] for k, v in media.items()}
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)[None]
        if positions is not None:
            positions = jnp.asarray(positions)[None]
    elif ids.ndim != 2:
        raise ValueError(f"prompt_ids: expected [seq] or [batch, seq], found shape {list(ids.shape)}")
    batch_size, seq = ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones_like(ids, dtype=bool)
    attention_mask = jnp.asarray(attention_mask, bool)
    if attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask: expected shape {list(ids.shape)}, found {list(attention_mask.shape)}")
    if positions is None:  # as transformers' generate(): cumsum of the mask, pads at 0
        positions = jnp.where(attention_mask, jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    batch = {"input_ids": ids, "attention_mask": attention_mask, "positions": jnp.asarray(positions, jnp.int32)}
    batch.update({k: jnp.asarray(v) for k, v in media.items() if v is not None})
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p,
                    suppress_ids=tuple(suppress_ids or ()), stop_ids=tuple(stop_ids or ()), pad_id=int(pad_id))
    cache = KVCache.init(cfg, max_len=seq + max_new_tokens, dtype=cache_dtype or model.dtype, batch=batch_size,
                         raw_keys=cache_raw_keys)
    state = _chunked_prefill(model, cache, key, batch, sampling, mask_mode, prefill_chunk_size)
    frozen = tuple(sampling.items())
    if streamer is None:
        # the whole decode loop on device; rows that finish early produce pad ids
        first = np.asarray(state.token)  # the state is donated to the loop below
        if max_new_tokens > 1:
            state, rest = _steps(model, state, frozen, max_new_tokens - 1)
            tokens = jnp.concatenate([first[None], rest])
        else:
            tokens = first[None]
    else:
        out = [np.asarray(state.token)]
        streamer(out[-1])
        for _ in range(max_new_tokens - 1):
            if bool(jnp.all(state.done)):
                out.append(np.full((batch_size,), pad_id, np.int32))
                continue
            state = _step(model, state, frozen)
            out.append(np.asarray(state.token))
            streamer(out[-1])
        tokens = jnp.asarray(np.stack(out))
    tokens = tokens.T  # [batch, new]
    return tokens[0] if single else tokens
