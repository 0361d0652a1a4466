"""The compiled generation loop: the state it carries (`DecodeState`: the KV cache and each row's progress),
prefill of every row and choice of its first token (`prefill_rows`), decode chunks of up to `DECODE_CHUNK` steps
(`decode_chunk`, a `lax.while_loop` that exits when every row is done) and the host loop around them
(`run_decode`, Ctrl-C between chunks). It owns the cache and the programs; `generate`, the chat session,
speculative decoding and the server plug into it. The per-step function is a parameter (`step=`, `sample_step` by
default) with the signature `(model, DecodeState, SamplingParams) -> (DecodeState, Choice)`.

Taps (`g4.Taps`, `model/taps.py`) ride along: `prefill_rows(..., taps=)`, `decode_chunk(..., taps=)` and
`run_decode(..., taps=)` hand them to the prefill and to the step (`step(model, state, params, taps=taps)`, which
then returns `(state, (choice, TapResult))`), so residual writes (steering) act on every prompt and generated token
and residual / attention reads of the position that chose each token come back in the `GenerationResult`. Their
layers are static, their values traced: new values compile nothing; without taps the programs are the ones above.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

from ..model.cache import KVCache
from ..model.decode import decode_step, forward_with_cache
from ..model.taps import TapResult, Taps
from ..model.taps import blank as blank_reads
from .batching import TOKEN_FIELDS
from .inputs import is_ordered
from .sampling import Choice, SamplingParams, choose

DECODE_CHUNK = 32  # decode steps per compiled chunk (between two Ctrl-C checks)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens only. Arrays are `[batch, new]` (or `[new]` for a 1-D prompt); a row ends at its length and is
    filled with the pad id after it (the stop id, when produced, is the row's last token)."""

    tokens: np.ndarray
    lengths: np.ndarray  # [batch] (or a scalar for a 1-D prompt)
    logprobs: np.ndarray | None = None  # log_softmax of the model's soft-capped logits at the chosen token
    # (under numerics="invariant": `sampling.ordered_log_softmax`, equal bit for bit to it on a training forward)
    sampling_logprobs: np.ndarray | None = None  # log-prob under the processed distribution sampled (0 if greedy)
    top_ids: np.ndarray | None = None  # [..., new, NUM_TOP]: the model's most likely tokens at each step
    top_logprobs: np.ndarray | None = None
    interrupted: bool = False  # Ctrl-C stopped it early (only when streaming; otherwise KeyboardInterrupt)
    prefilled: int = 0  # tokens per row the prefill ran over (the prompt's bucket, padding included)
    cache_slots: int = 0  # the cache bucket's max_len
    accepted_per_call: float | None = None  # speculative decoding: mean drafts accepted per target call (the call
    # yields that plus one token); None without an assistant
    target_calls: int = 0  # speculative decoding: target calls after the prefill (the longest row's)
    # `taps=` reads, of the position that chose each token (the prompt's last for token 0, then the token fed
    # before it), zero after a row's length: residual [batch, new, len(taps.residual), hidden]; attention
    # [batch, new, len(taps.attention), heads, cache_slots] over the cache's slots (slot s < prefilled: the
    # left-padded prompt's position s; slot prefilled + j: generated token j)
    residual: np.ndarray | None = None
    attention: np.ndarray | None = None

    @property
    def sequences(self) -> list[np.ndarray]:
        """Each row's tokens without the trailing pads."""
        tokens = self.tokens[None] if self.tokens.ndim == 1 else self.tokens
        lengths = np.atleast_1d(self.lengths)
        return [t[:n] for t, n in zip(tokens, lengths)]


class DecodeState(eqx.Module):
    cache: KVCache  # stacked over the batch
    token: Int[Array, " batch"]  # the last token produced (the next one to feed)
    done: Bool[Array, " batch"]
    count: Int[Array, " batch"]  # tokens produced so far
    max_new: Int[Array, ""] | Int[Array, " batch"]  # shared, or each row's own (the engine's slots)
    key: PRNGKeyArray | Key[Array, " batch"]  # one stream, or one per row (the engine's slots)


def finish_step(choice: Choice, state_done, count, max_new, params: SamplingParams):
    token = jnp.where(state_done, params.pad_id, choice.token)
    count = count + (~state_done).astype(count.dtype)
    done = state_done | params.is_stop(token) | (count >= max_new)
    return eqx.tree_at(lambda c: c.token, choice, token), done, count


def batched_decode_step(model, cache: KVCache, tokens: Int[Array, " batch"], taps: Taps | None = None
                        ) -> tuple[Float[Array, "batch vocab"], KVCache] | tuple[Float[Array, "batch vocab"], KVCache,
                                                                                TapResult]:
    """`decode_step` for every row of a batched cache.

    A batch of one runs without `vmap`, so each layer's cache write stays a `dynamic_update_slice` in place (vmapped,
    it becomes a scatter, which XLA:CPU turned into a rewrite and a copy of every full layer's cache on every step:
    benchmarks/RESULTS.md). Larger batches are vmapped. `taps`: values `[batch, writes, hidden]` (one row's
    vectors per row); then also returns each row's reads of its one position (`TapResult.position(0)`).
    """
    if taps is not None:
        def one(c, t, tp):
            logits, c, tapped = decode_step(model, t, c, tp)
            return logits, c, tapped.position(0)
        if tokens.shape[0] == 1:
            first = lambda tree: jax.tree.map(lambda x: x[0], tree)
            out = one(first(cache), tokens[0], first(taps))
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(one)(cache, tokens, taps)
    if tokens.shape[0] == 1:
        one_row = jax.tree.map(lambda x: x[0], cache)
        logits, one_row = decode_step(model, tokens[0], one_row)
        return logits[None], jax.tree.map(lambda x: x[None], one_row)
    return jax.vmap(lambda c, t: decode_step(model, t, c))(cache, tokens)


def sample_step(model, state: DecodeState, params: SamplingParams, taps: Taps | None = None
                ) -> tuple[DecodeState, Choice] | tuple[DecodeState, tuple[Choice, TapResult]]:
    """The default per-step function: feed every row's last token, choose the next from its logits. With `taps`
    (batched as for `batched_decode_step`) the choice comes with the fed position's reads: `(choice, TapResult)`."""
    if taps is None:
        logits, cache = batched_decode_step(model, state.cache, state.token)
    else:
        logits, cache, reads = batched_decode_step(model, state.cache, state.token, taps)
    key, sub = jax.random.split(state.key)
    choice, done, count = finish_step(choose(logits, sub, params, ordered=is_ordered(model)), state.done, state.count, state.max_new, params)
    new = DecodeState(cache, choice.token, done, count, state.max_new, key)
    return new, (choice if taps is None else (choice, reads))


def prefill_row(model, cache: KVCache, tokens: dict, media: dict, *, n_chunks, chunk: int | None,
                bounds: tuple | None, mask_mode, last: Int[Array, ""] | None = None,
                inputs_embeds: Float[Array, "seq hidden"] | None = None, taps: Taps | None = None
                ) -> tuple[KVCache, Float[Array, " hidden"]] | tuple[KVCache, Float[Array, " hidden"], TapResult]:
    """Write one row's prompt into `cache` in chunks (`n_chunks` of `chunk` tokens, or the static `bounds`); returns
    the cache and the last token's final hidden state (`last`: the hidden state of the token at that index of the
    prompt instead, for a prompt padded on the right). A multimodal prompt is embedded once and sliced, so every
    chunk keeps its soft tokens in order. `generate`'s prefill, speculative decoding's and the chat's run this.
    `inputs_embeds`: the prompt's embeddings in place of embedding `input_ids` (the media, if any, spliced in at the
    ids' placeholders). `taps`: applied to every chunk; their reads of the same token come back third."""
    ids = tokens["input_ids"]
    if inputs_embeds is not None:
        embeds = model.splice_media(inputs_embeds, ids, **media) if media else inputs_embeds
    else:
        embeds = model.embed(ids, **media) if media else None
    rest = {k: v for k, v in tokens.items() if k != "input_ids"}

    def run(cache, h, start, size):
        part = {k: jax.lax.dynamic_slice_in_dim(v, start, size) for k, v in rest.items()}
        if embeds is None:
            chunk_ids = jax.lax.dynamic_slice_in_dim(ids, start, size)
        else:
            chunk_ids, part["inputs_embeds"] = None, jax.lax.dynamic_slice_in_dim(embeds, start, size)
        if taps is None:
            out, cache = forward_with_cache(model, chunk_ids, cache, mask_mode=mask_mode, **part)
            at = lambda i: out[i]
        else:
            out, cache, tapped = forward_with_cache(model, chunk_ids, cache, mask_mode=mask_mode, taps=taps, **part)
            at = lambda i: (out[i], tapped.position(i))
        if last is None:
            return cache, at(-1)
        i = last - start
        inside = (i >= 0) & (i < size)
        return cache, jax.tree.map(lambda new, old: jnp.where(inside, new, old), at(jnp.clip(i, 0, size - 1)), h)

    h = jnp.zeros((model.config.text.hidden_size,), model.dtype)
    if taps is not None:
        h = (h, blank_reads(taps, model.layers, 1, cache.max_len, h.shape[0], h.dtype).position(0))
    if bounds is not None:
        for start, end in bounds:
            cache, h = run(cache, h, start, end - start)
    else:
        cache, h = jax.lax.fori_loop(0, n_chunks, lambda i, c: run(*c, i * chunk, chunk), (cache, h))
    return (cache, h) if taps is None else (cache,) + h


@functools.partial(jax.jit, static_argnames=("chunk", "bounds", "max_len", "mask_mode", "cache_dtype", "raw_keys"))
def prefill_rows(model, cache, batch, n_chunks, max_new, key, params, real=None, *, chunk, bounds, max_len, mask_mode,
             cache_dtype, raw_keys, taps=None):
    """Prefill every row (chunks of `chunk` tokens, `n_chunks` of them; or the static `bounds`) and choose each
    row's first token. `cache=None` allocates one of `max_len` slots inside the program (no eager zeros).

    `real` (a traced token count, one for every row): the prompt is padded on the right beyond its first `real`
    tokens (the chat's turns, in chunks of a fixed size); the first token follows token `real - 1`, and the cache
    is rolled back over the padding (`KVCache.truncate`: at most `spare + 1` padding tokens).

    `batch["inputs_embeds"]` (`[batch, seq, hidden]`, aligned with the token fields): the prompts' embeddings in
    place of embedding their ids (`prefill_row`). `taps`: values `[batch, writes, hidden]`; the choice then comes
    as `(choice, TapResult)`, the reads of the token each first choice follows."""
    taps = None if taps is None or taps.empty else taps
    embeds = batch.get("inputs_embeds")
    tokens = {k: v for k, v in batch.items() if k in TOKEN_FIELDS}
    media = {k: v for k, v in batch.items() if k not in TOKEN_FIELDS and k != "inputs_embeds"}
    cfg = model.config

    def one(cache, tokens, media, embeds, taps):
        if cache is None:
            cache = KVCache.init(cfg, max_len=max_len, dtype=cache_dtype, raw_keys=raw_keys)
        # a regrouped stack (e.g. `g4.serving_layout`) reads its cache in its own layout: gathered once here
        cache = eqx.tree_at(lambda c: c.layers, cache, model.layers.own_cache_layout(cache.layers))
        start = cache.length
        cache, h, *reads = prefill_row(model, cache, tokens, media, n_chunks=n_chunks, chunk=chunk, bounds=bounds,
                                       mask_mode=mask_mode, last=None if real is None else real - 1,
                                       inputs_embeds=embeds, taps=taps)
        if real is not None:
            cache = cache.truncate(start + real)
        return (model.logits_from_hidden(h), cache, *reads)

    logits, cache, *reads = jax.vmap(one)(cache, tokens, media, embeds, taps)
    key, sub = jax.random.split(key)
    b = logits.shape[0]
    choice, done, count = finish_step(choose(logits, sub, params, ordered=is_ordered(model)), jnp.zeros(b, bool), jnp.zeros(b, jnp.int32),
                                  max_new, params)
    return DecodeState(cache, choice.token, done, count, max_new, key), (choice if taps is None else (choice, *reads))


def _carried_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` without its leading size-one axes (a batch of one, a serving layout's [repeats, run_length] = [1, 1]),
    keeping a cache tensor's last three axes [slots, kv_heads, head_dim] whole: dropping a single KV head there made
    each full layer's update a bitcast XLA:CPU cannot do in place, so it copied the layer's whole cache every step."""
    keep = 3 if len(shape) >= 4 else 0
    lead = shape[:len(shape) - keep]
    return tuple(d for d in lead if d != 1) + shape[len(shape) - keep:]


@functools.partial(jax.jit, static_argnames=("step", "size"), donate_argnames=("state",))
def decode_chunk(model, state: DecodeState, params: SamplingParams, steps: Int[Array, ""], *,
                 step: Callable = sample_step, size: int = DECODE_CHUNK, taps: Taps | None = None,
                 until_freed: Bool[Array, ""] | None = None
                 ) -> tuple[DecodeState, Choice | tuple[Choice, TapResult], Int[Array, ""]]:
    """At most `min(steps, size)` decode steps; stops early once every row is done. Returns the state, the
    choices `[batch, size]` (the first `n` columns are real) and `n`. `taps`: passed to every step (see the
    module docstring); the choices then come as `(Choice, TapResult)`. `until_freed` (traced; the serving
    engine's): when True, also stop after the step in which a row that was running finishes (its slot is then
    free for a waiting request)."""
    b = state.token.shape[0]
    extra = {} if taps is None or taps.empty else {"taps": taps}
    probe = jax.eval_shape(lambda: step(model, state, params, **extra)[1])
    blank = jax.tree.map(lambda x: jnp.zeros((b, size) + x.shape[1:], x.dtype), probe)
    # The loop carries every array without its leading size-one axes (batch 1, the cache's [repeats, run_length] =
    # [1, 1] of a serving layout) and the body restores them: with them, XLA:CPU copied each cache entry into and out
    # of a differently laid out buffer on every step (benchmarks/RESULTS.md, issue 19).
    shapes = jax.tree.map(jnp.shape, state)
    squeeze = lambda tree: jax.tree.map(lambda x: x.reshape(_carried_shape(x.shape)), tree)
    restore = lambda tree: jax.tree.map(lambda x, shape: x.reshape(shape), tree, shapes)

    def cond(carry):
        i, packed, _ = carry
        done = restore(packed).done
        go = (i < jnp.minimum(steps, size)) & ~jnp.all(done)
        if until_freed is not None:
            go = go & ~(until_freed & jnp.any(done & ~state.done))
        return go

    def body(carry):
        i, packed, out = carry
        state, choice = step(model, restore(packed), params, **extra)
        out = jax.tree.map(lambda buf, x: buf.at[:, i].set(x), out, choice)
        return i + 1, squeeze(state), out

    n, packed, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), squeeze(state), blank))
    return restore(packed), out, n


class CtrlC:
    """While active (main thread only), the first SIGINT sets a flag; a second one raises at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def run_decode(model, state: DecodeState, first: Choice | tuple[Choice, TapResult], params: SamplingParams, *,
               max_new_tokens: int,
               streamer=None, step: Callable = sample_step, pad_id: int = 0, chunk: int = DECODE_CHUNK,
               taps: Taps | None = None) -> tuple[GenerationResult, DecodeState]:
    """The host loop: decode chunks until every row is done (or Ctrl-C), collecting the choices in numpy.
    Returns the result and the final state (its cache holds the prompt and every token fed back). `taps`: passed to
    `decode_chunk`; `first` is then `(Choice, TapResult)` (from `prefill_rows(..., taps=)`) and the reads come back
    in the result's `residual` and `attention`."""
    host = lambda c: jax.tree.map(np.asarray, c)
    extra, read_pieces = {}, []
    taps = None if taps is None or taps.empty else taps
    if taps is not None:
        extra = {"taps": taps}
        first, reads = first
        read_pieces.append(jax.tree.map(lambda x: x[:, None], host(reads)))
    pieces = [jax.tree.map(lambda x: x[:, None], host(first))]
    if streamer is not None:
        streamer(pieces[0].token[:, 0])
    produced = 1
    interrupted = False
    with CtrlC() as ctrl_c:
        while produced < max_new_tokens and not bool(np.asarray(state.done).all()):
            if ctrl_c.hit:
                break
            steps = 1 if streamer is not None else min(chunk, max_new_tokens - produced)
            state, out, n = decode_chunk(model, state, params, np.int32(steps), step=step, size=chunk, **extra)
            n = int(n)
            if taps is not None:
                out, reads = out
                read_pieces.append(jax.tree.map(lambda x: x[:, :n], host(reads)))
            out = jax.tree.map(lambda x: x[:, :n], host(out))
            pieces.append(out)
            produced += n
            if streamer is not None:
                for i in range(n):
                    streamer(out.token[:, i])
        interrupted = ctrl_c.hit
    if interrupted and streamer is None:
        raise KeyboardInterrupt
    cat = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *pieces)
    length = cat.token.shape[1]
    width = length if interrupted else max_new_tokens
    padded = lambda x, fill: np.concatenate([x, np.full((x.shape[0], width - length) + x.shape[2:], fill, x.dtype)], 1)
    tokens = padded(cat.token, pad_id)
    # a row's length: up to and including its stop id (or all it produced)
    stopped = np.asarray(params.stop)[cat.token]
    first_stop = np.where(stopped.any(1), stopped.argmax(1) + 1, length)
    live = np.arange(length)[None] < first_stop[:, None]
    lengths = live.sum(1).astype(np.int32)
    tapped = {}
    if read_pieces:
        reads = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *read_pieces)
        kept = lambda x: padded(np.where(live.reshape(live.shape + (1,) * (x.ndim - 2)), x, 0).astype(x.dtype), 0)
        tapped = {name: kept(getattr(reads, name)) for name in ("residual", "attention")
                  if getattr(reads, name) is not None}
    return GenerationResult(**tapped, tokens=tokens, lengths=lengths, logprobs=padded(cat.logprob, 0.0),
                            sampling_logprobs=padded(cat.sampling_logprob, 0.0), top_ids=padded(cat.top_ids, 0),
                            top_logprobs=padded(cat.top_logprobs, 0.0), interrupted=interrupted), state
