"""`g4.generate`: prefill once, then decode from the KV cache, compiling once per coarse shape.

What is compiled, and for which shapes (the "buckets"):

- **Prompt.** A text prompt of L tokens is left-padded (attention_mask False, positions `cumsum(mask) - 1`, pads
  at 0, as transformers' `generate()` builds them) to P, a multiple of the chunk size c = the largest of
  (1, 8, 64, 512, 4096) not above L, and prefilled in P / c chunks of c tokens by one `lax.fori_loop` whose trip
  count is traced: one program per (c, cache bucket, batch). P < L + c <= 2L, so no prompt prefills more than
  twice its length. A prompt with image or video soft tokens is prefilled whole (a chunk must not cut a
  bidirectional vision block): P = the next power of two >= max(L, 8), again at most 2L.
- **Media.** Images (video frames, audio clips) per row are padded to a power-of-two count with all-padding items
  (positions (-1, -1), mask False), audio frames to a power of two with mask False; the splice skips them.
- **Cache.** `max_len` = the next power of two >= max(P + max_new_tokens, 256) (capped at the model's context).
- **Decoding.** One program per (cache bucket, batch): a `lax.while_loop` of at most `DECODE_CHUNK` steps that
  exits as soon as every row has produced a stop id or its `max_new_tokens` (a traced bound). The host runs
  these chunks until every row is done, checking for Ctrl-C (SIGINT) in between.
- **Sampling settings** (temperature, top-k, top-p, greedy, stop/suppress ids, pad id) are traced
  (`gemma4_eqx.sampling`): changing them compiles nothing.

Padding changes no result: pads are masked keys before every real token, so slot distances between real tokens
(the sliding window) and their positions are those of the unpadded prompt.

Defaults (stop ids, suppressed ids, pad id, temperature, top-k, top-p) come from `generation_config=` (a
`GenerationConfig`, a checkpoint folder or a dict), else from the model's config (see `generation_config.py`).

The per-step function of the decode loop is a parameter (`step=`): `sample_step` by default; a speculative
verify step plugs in with the same signature.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .batching import split_batch, stack_samples
from ..model.cache import KVCache
from ..model.decode import decode_step, forward_with_cache, prefill_chunks
from ..config.generation import GenerationConfig
from ..model.masks import TokenType
from .sampling import Choice, SamplingParams, choose, top_k_mask, top_p_mask  # noqa: F401 (re-exported)

# Kept for callers that imported them; the defaults now come from the generation config.
DEFAULT_STOP_IDS = (1, 106, 50)
DEFAULT_SUPPRESS_IDS = (258882, 258883)

PREFILL_CHUNKS = (1, 8, 64, 512, 4096)  # text prompts: chunk size = the largest not above the prompt length
MIN_CACHE = 256  # smallest cache bucket (slots)
DECODE_CHUNK = 32  # decode steps per compiled chunk (between two Ctrl-C checks)
TOKEN_FIELDS = ("input_ids", "attention_mask", "positions", "mm_token_type_ids")
MEDIA_FIELDS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                "input_features", "input_features_mask")
IGNORED_PROCESSOR_FIELDS = ("num_frames_per_video", "num_soft_tokens_per_image", "token_type_ids")
# transformers' generate() keywords: (our spelling or None, what to say)
TRANSFORMERS_ALIASES = {"eos_token_id": "stop_ids", "suppress_tokens": "suppress_ids", "pad_token_id": "pad_id",
                        "position_ids": "positions", "input_ids": "prompt_ids"}
REFUSED = {
    "num_beams": "beam search is not supported (num_beams=1 is accepted); use sampling or greedy decoding",
    "repetition_penalty": "repetition_penalty is not supported (1.0 is accepted); use suppress_ids to ban tokens",
    "output_scores": "use return_logprobs=True (GenerationResult.logprobs / top_logprobs)",
    "return_dict_in_generate": "use return_result=True to get a GenerationResult",
    "min_new_tokens": "min_new_tokens is not supported",
    "streamer": None,
}


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def prompt_bucket(length: int, vision: bool, chunk_size: int | None = None) -> tuple[int, int]:
    """(padded prompt length P, prefill chunk size c) for a prompt of `length` tokens (see the module doc)."""
    if vision:
        p = max(next_pow2(length), 8)
        return p, p
    c = chunk_size or max(x for x in PREFILL_CHUNKS if x <= max(length, 1))
    return -(-length // c) * c, c


def cache_bucket(needed: int, context: int) -> int:
    return max(needed, min(next_pow2(max(needed, MIN_CACHE)), context))


# ---- the result ----------------------------------------------------------------------------------------
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

    @property
    def sequences(self) -> list[np.ndarray]:
        """Each row's tokens without the trailing pads."""
        tokens = self.tokens[None] if self.tokens.ndim == 1 else self.tokens
        lengths = np.atleast_1d(self.lengths)
        return [t[:n] for t, n in zip(tokens, lengths)]


# ---- the compiled pieces -------------------------------------------------------------------------------
class DecodeState(eqx.Module):
    cache: KVCache  # stacked over the batch
    token: Int[Array, " batch"]  # the last token produced (the next one to feed)
    done: Bool[Array, " batch"]
    count: Int[Array, " batch"]  # tokens produced so far
    max_new: Int[Array, ""]
    key: PRNGKeyArray


def _ordered(model) -> bool:
    """The log-probs through `ordered_log_softmax` when the model runs `numerics="invariant"`."""
    numerics = model.numerics
    return getattr(numerics, "name", numerics) == "invariant"


def _finish(choice: Choice, state_done, count, max_new, params: SamplingParams):
    token = jnp.where(state_done, params.pad_id, choice.token)
    count = count + (~state_done).astype(count.dtype)
    done = state_done | params.stop[token] | (count >= max_new)
    return eqx.tree_at(lambda c: c.token, choice, token), done, count


def batched_decode_step(model, cache: KVCache, tokens: Int[Array, " batch"]
                        ) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """`decode_step` for every row of a batched cache.

    A batch of one runs without `vmap`, so each layer's cache write stays a `dynamic_update_slice` in place (vmapped,
    it becomes a scatter, which XLA:CPU turned into a rewrite and a copy of every full layer's cache on every step:
    benchmarks/RESULTS.md). Larger batches are vmapped.
    """
    if tokens.shape[0] == 1:
        one_row = jax.tree.map(lambda x: x[0], cache)
        logits, one_row = decode_step(model, tokens[0], one_row)
        return logits[None], jax.tree.map(lambda x: x[None], one_row)
    return jax.vmap(lambda c, t: decode_step(model, t, c))(cache, tokens)


def sample_step(model, state: DecodeState, params: SamplingParams) -> tuple[DecodeState, Choice]:
    """The default per-step function: feed every row's last token, choose the next from its logits."""
    logits, cache = batched_decode_step(model, state.cache, state.token)
    key, sub = jax.random.split(state.key)
    choice, done, count = _finish(choose(logits, sub, params, ordered=_ordered(model)), state.done, state.count, state.max_new, params)
    return DecodeState(cache, choice.token, done, count, state.max_new, key), choice


def prefill_row(model, cache: KVCache, tokens: dict, media: dict, *, n_chunks, chunk: int | None,
                bounds: tuple | None, mask_mode, last: Int[Array, ""] | None = None
                ) -> tuple[KVCache, Float[Array, " hidden"]]:
    """Write one row's prompt into `cache` in chunks (`n_chunks` of `chunk` tokens, or the static `bounds`); returns
    the cache and the last token's final hidden state (`last`: the hidden state of the token at that index of the
    prompt instead, for a prompt padded on the right). A multimodal prompt is embedded once and sliced, so every
    chunk keeps its soft tokens in order. `generate`'s prefill, speculative decoding's and the chat's run this."""
    ids = tokens["input_ids"]
    embeds = model.embed(ids, **media) if media else None
    rest = {k: v for k, v in tokens.items() if k != "input_ids"}

    def run(cache, h, start, size):
        part = {k: jax.lax.dynamic_slice_in_dim(v, start, size) for k, v in rest.items()}
        if embeds is None:
            chunk_ids = jax.lax.dynamic_slice_in_dim(ids, start, size)
        else:
            chunk_ids, part["inputs_embeds"] = None, jax.lax.dynamic_slice_in_dim(embeds, start, size)
        out, cache = forward_with_cache(model, chunk_ids, cache, mask_mode=mask_mode, **part)
        if last is None:
            return cache, out[-1]
        i = last - start
        return cache, jnp.where((i >= 0) & (i < size), out[jnp.clip(i, 0, size - 1)], h)

    h = jnp.zeros((model.config.text.hidden_size,), model.dtype)
    if bounds is not None:
        for start, end in bounds:
            cache, h = run(cache, h, start, end - start)
    else:
        cache, h = jax.lax.fori_loop(0, n_chunks, lambda i, c: run(*c, i * chunk, chunk), (cache, h))
    return cache, h


@functools.partial(jax.jit, static_argnames=("chunk", "bounds", "max_len", "mask_mode", "cache_dtype", "raw_keys"))
def _prefill(model, cache, batch, n_chunks, max_new, key, params, real=None, *, chunk, bounds, max_len, mask_mode,
             cache_dtype, raw_keys):
    """Prefill every row (chunks of `chunk` tokens, `n_chunks` of them; or the static `bounds`) and choose each
    row's first token. `cache=None` allocates one of `max_len` slots inside the program (no eager zeros).

    `real` (a traced token count, one for every row): the prompt is padded on the right beyond its first `real`
    tokens (the chat's turns, in chunks of a fixed size); the first token follows token `real - 1`, and the cache
    is rolled back over the padding (`KVCache.truncate`: at most `spare + 1` padding tokens)."""
    tokens = {k: v for k, v in batch.items() if k in TOKEN_FIELDS}
    media = {k: v for k, v in batch.items() if k not in TOKEN_FIELDS}
    cfg = model.config

    def one(cache, tokens, media):
        if cache is None:
            cache = KVCache.init(cfg, max_len=max_len, dtype=cache_dtype, raw_keys=raw_keys)
        # a regrouped stack (e.g. `g4.serving_layout`) reads its cache in its own layout: gathered once here
        cache = eqx.tree_at(lambda c: c.layers, cache, model.layers.own_cache_layout(cache.layers))
        start = cache.length
        cache, h = prefill_row(model, cache, tokens, media, n_chunks=n_chunks, chunk=chunk, bounds=bounds,
                               mask_mode=mask_mode, last=None if real is None else real - 1)
        if real is not None:
            cache = cache.truncate(start + real)
        return model.logits_from_hidden(h), cache

    logits, cache = jax.vmap(one)(cache, tokens, media)
    key, sub = jax.random.split(key)
    b = logits.shape[0]
    choice, done, count = _finish(choose(logits, sub, params, ordered=_ordered(model)), jnp.zeros(b, bool), jnp.zeros(b, jnp.int32),
                                  max_new, params)
    return DecodeState(cache, choice.token, done, count, max_new, key), choice


@functools.partial(jax.jit, static_argnames=("step", "size"), donate_argnames=("state",))
def decode_chunk(model, state: DecodeState, params: SamplingParams, steps: Int[Array, ""], *,
                 step: Callable = sample_step, size: int = DECODE_CHUNK) -> tuple[DecodeState, Choice, Int[Array, ""]]:
    """At most `min(steps, size)` decode steps; stops early once every row is done. Returns the state, the
    choices `[batch, size]` (the first `n` columns are real) and `n`."""
    b = state.token.shape[0]
    probe = jax.eval_shape(lambda: step(model, state, params)[1])
    blank = jax.tree.map(lambda x: jnp.zeros((b, size) + x.shape[1:], x.dtype), probe)
    # The loop carries every array without its size-one axes (batch 1, the cache's [repeats, run_length] = [1, 1] of
    # a serving layout, one KV head) and the body restores them: with them, XLA:CPU copied each cache entry into and
    # out of a differently laid out buffer on every step (benchmarks/RESULTS.md, issue 19).
    shapes = jax.tree.map(jnp.shape, state)
    squeeze = lambda tree: jax.tree.map(lambda x: x.reshape(tuple(d for d in x.shape if d != 1)), tree)
    restore = lambda tree: jax.tree.map(lambda x, shape: x.reshape(shape), tree, shapes)

    def cond(carry):
        i, packed, _ = carry
        return (i < jnp.minimum(steps, size)) & ~jnp.all(restore(packed).done)

    def body(carry):
        i, packed, out = carry
        state, choice = step(model, restore(packed), params)
        out = jax.tree.map(lambda buf, x: buf.at[:, i].set(x), out, choice)
        return i + 1, squeeze(state), out

    n, packed, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), squeeze(state), blank))
    return restore(packed), out, n


# ---- inputs: checks, processor batches, buckets -------------------------------------------------------
def check_settings(model, *, temperature, top_k, top_p, stop_ids, suppress_ids, pad_id, max_new_tokens,
                   prompt_length: int) -> None:
    vocab = model.config.text.vocab_size
    context = model.config.text.max_position_embeddings
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), found {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k: expected an integer >= 0 (0 or None = no top-k filter), found {top_k}")
    if top_p is not None and not (math.isfinite(float(top_p)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1], found {top_p}")
    bad = [i for i in stop_ids if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"stop_ids: {bad} lie outside the vocabulary [0, {vocab})")
    if not 0 <= int(pad_id) < vocab:
        raise ValueError(f"pad_id: {pad_id} lies outside the vocabulary [0, {vocab})")
    outside = [i for i in suppress_ids if not 0 <= int(i) < vocab]
    if outside:
        warnings.warn(f"suppress_ids: {outside} lie outside the vocabulary [0, {vocab}) and are ignored",
                      stacklevel=3)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive integer, found {max_new_tokens}")
    if prompt_length + max_new_tokens > context:
        raise ValueError(f"max_new_tokens: the prompt ({prompt_length} tokens) plus {max_new_tokens} new tokens "
                         f"exceed the model's context of {context} (text_config.max_position_embeddings)")


def _reject_unknown(kwargs: dict) -> dict:
    """transformers habits: supported under our name, accepted when harmless, or refused by name."""
    out = {}
    for k, v in kwargs.items():
        if k in MEDIA_FIELDS:
            out[k] = v
        elif k in IGNORED_PROCESSOR_FIELDS:
            continue
        elif k == "num_beams" and v in (None, 1):
            continue
        elif k == "repetition_penalty" and v in (None, 1.0):
            continue
        elif k in REFUSED:
            raise TypeError(f"generate: {k}={v!r}: {REFUSED[k]}")
        else:
            known = MEDIA_FIELDS + tuple(TRANSFORMERS_ALIASES) + ("max_new_tokens", "temperature", "top_k", "top_p",
                                                                   "do_sample", "max_length", "attention_mask")
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; media keywords are {', '.join(MEDIA_FIELDS)}"
            raise TypeError(f"generate: unexpected keyword {k!r}{hint}")
    return out


def _as_batch(model, ids: np.ndarray, attention_mask, positions, media: dict) -> dict[str, np.ndarray]:
    """Per-row numpy inputs `[batch, ...]`; a processor batch's stacked media are split per row."""
    batch: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        batch["attention_mask"] = np.asarray(attention_mask)
    if positions is not None:
        batch["positions"] = np.asarray(positions)
    media = {k: np.asarray(v) for k, v in media.items() if v is not None}
    if "mm_token_type_ids" in media:
        batch["mm_token_type_ids"] = media.pop("mm_token_type_ids")
    per_item_ndim = {"pixel_values": 3, "image_position_ids": 3, "pixel_values_videos": 3,
                     "video_position_ids": 3, "input_features": 3, "input_features_mask": 2}
    flat = [k for k, v in media.items() if v.ndim == per_item_ndim[k]]
    if flat:  # transformers' layout: every item of the batch stacked -> each row its own items
        split = split_batch({**batch, **media}, model.config)
        batch = stack_samples([{k: v for k, v in s.items()} for s in split])
    else:
        batch.update(media)
    return batch


def _check_prompt_ids(model, ids: np.ndarray, media: dict) -> None:
    """Before tracing: ids inside the vocabulary, and every modality whose placeholders appear has its media."""
    cfg = model.config
    vocab = cfg.text.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"prompt_ids: token ids must lie in [0, {vocab}) (vocab_size); found values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    for token_id, name, what in ((cfg.image_token_id, "pixel_values", "image"),
                                 (cfg.video_token_id, "pixel_values_videos", "video"),
                                 (cfg.audio_token_id, "input_features", "audio")):
        if media.get(name) is None and bool((ids == token_id).any()):
            raise ValueError(f"{name}: prompt_ids hold {what} placeholder tokens but no {name} was given for them "
                             "(pass the processor's media arrays)")


def _check_padding(ids: np.ndarray, mask: np.ndarray | None, pad_id: int) -> None:
    if mask is not None:
        if not mask[:, -1].all():
            raise ValueError("attention_mask: some rows end with padding (right padding); generation continues from "
                             "the last column, so pad on the left (the processor's tokenizer does)")
        if not mask.any(axis=1).all():
            raise ValueError("attention_mask: some rows have no real token")
        return
    if (ids[:, 0] == pad_id).any() or (ids[:, -1] == pad_id).any():
        warnings.warn(f"prompt_ids: some rows start or end with the pad id {pad_id} but no attention_mask was given; "
                      "pads are then attended like real tokens. Pass attention_mask (False at padding), as "
                      "transformers asks", stacklevel=3)


def _pad_rows(batch: dict, p: int, pad_id: int, has_vision: bool) -> dict:
    """Left-pad the token fields to `p` and the media to power-of-two item (and audio frame) counts."""
    ids = batch["input_ids"]
    b, s = ids.shape
    extra = p - s
    mask = batch.get("attention_mask")
    mask = np.ones((b, s), bool) if mask is None else mask.astype(bool)
    out = {"input_ids": np.concatenate([np.full((b, extra), pad_id, np.int32), ids.astype(np.int32)], 1),
           "attention_mask": np.concatenate([np.zeros((b, extra), bool), mask], 1)}
    if "positions" in batch:
        out["positions"] = np.concatenate([np.zeros((b, extra), np.int32), batch["positions"].astype(np.int32)], 1)
    else:  # as transformers' generate(): cumsum of the mask, pads at 0
        out["positions"] = np.where(out["attention_mask"], np.cumsum(out["attention_mask"], 1) - 1, 0).astype(np.int32)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = np.concatenate([np.zeros((b, extra), np.int32),
                                                   batch["mm_token_type_ids"].astype(np.int32)], 1)
    for k in MEDIA_FIELDS:
        if k not in batch:
            continue
        v = batch[k]
        n = next_pow2(v.shape[1])
        fill = -1 if k.endswith("position_ids") else 0
        widths = [(0, 0), (0, n - v.shape[1])] + [(0, 0)] * (v.ndim - 2)
        if k.startswith("input_features"):
            widths[2] = (0, next_pow2(v.shape[2]) - v.shape[2])
        out[k] = np.pad(v, widths, constant_values=fill if not k.endswith("_mask") else False)
    return out


# ---- Ctrl-C between chunks ------------------------------------------------------------------------------
class _Interrupt:
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


# ---- generate --------------------------------------------------------------------------------------------
def generate(
    model,
    prompt_ids=None,
    *,
    max_new_tokens: int | None = None,
    key: PRNGKeyArray | None = None,
    temperature: float | int | None = None,
    top_k: int | None = -1,
    top_p: float | int | None = -1.0,
    stop_ids: Sequence[int] | None = None,
    suppress_ids: Sequence[int] | None = None,
    attention_mask=None,
    positions=None,
    pad_id: int | None = None,
    streamer: Callable[[np.ndarray], None] | None = None,
    generation_config: GenerationConfig | str | os.PathLike | dict | None = None,
    return_logprobs: bool = False,
    return_result: bool = False,
    do_sample: bool | None = None,
    max_length: int | None = None,
    cache_dtype=None,
    cache_raw_keys: bool = True,
    prefill_chunk_size: int | None = None,
    mask_mode: str = "intended",
    step: Callable = sample_step,
    assistant=None,
    num_draft_tokens: int = 4,
    **media,
):
    """Generate up to `max_new_tokens` (default 64) new tokens after `prompt_ids`; returns only the new tokens.

    `prompt_ids` 1-D (one prompt; media keywords as for `model(...)`) -> `[new]`, or 2-D left-padded with an
    `attention_mask` -> `[batch, new]`. A processor batch (`**proc(...)`: `input_ids`, `attention_mask`,
    `mm_token_type_ids`, media stacked over the batch) can be passed as it is.

    Returns the token array (pad id after a row's stop id), as before; `return_result=True` or
    `return_logprobs=True` returns a `GenerationResult` (tokens, lengths, and with `return_logprobs` the chosen
    tokens' log-probs under the model, under the processed sampling distribution, and each step's top log-probs).

    Unset settings come from `generation_config` (see `gemma4_eqx.generation_config`). `temperature=0` or
    `do_sample=False` is greedy. `max_length` (transformers: prompt + new) is accepted instead of `max_new_tokens`.
    `streamer(tokens)` receives each step's tokens (shape `[batch]`) as they are produced; while streaming, Ctrl-C
    stops generation and returns what was produced (without a streamer it raises KeyboardInterrupt after at most
    one decode chunk). `cache_raw_keys=False`: see `g4.KVCache.init`. `step`: the per-step function of the decode
    loop (see `sample_step`). `assistant=`: speculative decoding with a drafter (`g4.Assistant`, the Gemma 4 MTP
    drafter, or `g4.PromptLookupDrafter`), `num_draft_tokens` per target call; the output distribution is the
    target's (greedy: its exact tokens); `GenerationResult.accepted_per_call` reports acceptance
    (`gemma4_eqx.speculative`).
    """
    if "input_ids" in media:
        if prompt_ids is not None:
            raise TypeError("generate: give prompt_ids or input_ids, not both")
        prompt_ids = media.pop("input_ids")
    if "position_ids" in media:
        positions = media.pop("position_ids")
    for theirs, ours in (("eos_token_id", "stop_ids"), ("suppress_tokens", "suppress_ids"),
                         ("pad_token_id", "pad_id")):
        if theirs in media:
            value = media.pop(theirs)
            if ours == "stop_ids":
                stop_ids = () if value is None else (tuple(value) if isinstance(value, (list, tuple)) else (value,))
            elif ours == "suppress_ids":
                suppress_ids = value
            else:
                pad_id = value
    if "streamer" in media:
        media.pop("streamer")
    token_types = media.pop("mm_token_type_ids", None)
    media = _reject_unknown(media)
    if prompt_ids is None:
        raise TypeError("generate: prompt_ids (or input_ids) is required")

    cfg = model.config
    gen = GenerationConfig.resolve(generation_config, cfg)
    if temperature is None:
        temperature = gen.temperature
    if do_sample is False:
        temperature = 0.0
    top_k = gen.top_k if top_k == -1 else top_k
    top_p = gen.top_p if top_p == -1.0 else top_p
    stop_ids = tuple(int(i) for i in (gen.stop_ids if stop_ids is None else stop_ids))
    suppress_ids = tuple(int(i) for i in (gen.suppress_ids if suppress_ids is None else suppress_ids))
    if pad_id is None:
        pad_id = cfg.text.pad_token_id if gen.pad_id is None else gen.pad_id

    ids = np.asarray(prompt_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt_ids: expected integer token ids, found dtype {ids.dtype}")
    single = ids.ndim == 1
    if ids.ndim not in (1, 2):
        raise ValueError(f"prompt_ids: expected [seq] or [batch, seq], found shape {list(ids.shape)}")
    if max_length is not None:
        if max_new_tokens is not None:
            raise TypeError("generate: give max_new_tokens or max_length (prompt + new), not both")
        max_new_tokens = int(max_length) - ids.shape[-1]
        if max_new_tokens <= 0:
            raise ValueError(f"max_length: {max_length} leaves no room after a prompt of {ids.shape[-1]} tokens")
    max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
    check_settings(model, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                   suppress_ids=suppress_ids, pad_id=pad_id, max_new_tokens=max_new_tokens,
                   prompt_length=ids.shape[-1])
    if temperature > 0 and key is None:
        raise ValueError("key: sampling (temperature > 0) needs an explicit jax.random key")
    if prefill_chunk_size is not None and prefill_chunk_size <= 0:
        raise ValueError(f"prefill_chunk_size: expected a positive number of tokens, found {prefill_chunk_size}")
    key = jax.random.key(0) if key is None else key

    if single:
        ids = ids[None]
        attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
        positions = None if positions is None else np.asarray(positions)[None]
        token_types = None if token_types is None else np.asarray(token_types)[None]
        media = {k: np.asarray(v)[None] for k, v in media.items() if v is not None}
    for name, value in (("attention_mask", attention_mask), ("positions", positions),
                        ("mm_token_type_ids", token_types)):
        if value is not None and np.shape(value) != ids.shape:
            raise ValueError(f"{name}: expected shape {list(ids.shape)} like prompt_ids, found {list(np.shape(value))}")
    _check_padding(ids, None if attention_mask is None else np.asarray(attention_mask, bool), pad_id)
    _check_prompt_ids(model, ids, media)
    batch = _as_batch(model, ids, attention_mask, positions, {"mm_token_type_ids": token_types, **media})
    types = batch.get("mm_token_type_ids")
    has_vision = types is not None and bool(np.isin(types, (TokenType.IMAGE, TokenType.VIDEO)).any())
    b, seq = batch["input_ids"].shape

    if prefill_chunk_size is not None and has_vision:
        p, chunk = seq, None
        bounds = tuple(prefill_chunks(types, seq, prefill_chunk_size))
    else:
        p, chunk = prompt_bucket(seq, has_vision, prefill_chunk_size)
        bounds = None
    padded = _pad_rows(batch, p, pad_id, has_vision)
    spec_room = 0 if assistant is None else int(num_draft_tokens) + 1  # speculative: room for a verify chunk
    max_len = cache_bucket(p + max_new_tokens + spec_room, cfg.text.max_position_embeddings + p - seq + spec_room)
    # the chunked loop slices [start, start + chunk) of the token fields: give them the cache's length
    if bounds is None and chunk != p:
        padded = {k: (np.pad(v, [(0, 0), (0, max_len - p)]) if k in TOKEN_FIELDS else v) for k, v in padded.items()}
    if "mm_token_type_ids" in padded and not has_vision:
        padded.pop("mm_token_type_ids")  # no vision block: keep the text-only program (banded sliding attention)
    params = SamplingParams.make(cfg.text.vocab_size, temperature=float(temperature), top_k=top_k, top_p=top_p,
                                 suppress_ids=suppress_ids, stop_ids=stop_ids, pad_id=int(pad_id))
    device_batch = jax.device_put(padded)  # a transfer; jnp.asarray would compile a copy per shape
    if assistant is not None:  # speculative decoding (speculative.py)
        return _speculative_hook(model, assistant, device_batch, single=single, p=p, chunk=chunk, bounds=bounds,
                                 max_len=max_len, max_new_tokens=max_new_tokens, key=key, params=params,
                                 num_draft_tokens=num_draft_tokens, mask_mode=mask_mode,
                                 cache_dtype=jnp.dtype(cache_dtype or model.dtype), raw_keys=cache_raw_keys,
                                 return_result=return_result, refused=dict(streamer=streamer, step=step,
                                                                           return_logprobs=return_logprobs))
    state, first = _prefill(model, None, device_batch, np.int32(p // chunk if chunk else 0),
                            np.int32(max_new_tokens), key, params, chunk=chunk, bounds=bounds, max_len=max_len,
                            mask_mode=mask_mode, cache_dtype=jnp.dtype(cache_dtype or model.dtype),
                            raw_keys=cache_raw_keys)
    result, _ = run_decode(model, state, first, params, max_new_tokens=max_new_tokens, streamer=streamer, step=step,
                           pad_id=int(pad_id))
    result = dataclasses.replace(result, prefilled=p, cache_slots=max_len)
    if single:
        result = dataclasses.replace(result, **{f.name: (np.asarray(getattr(result, f.name)[0]) if isinstance(
            getattr(result, f.name), np.ndarray) else getattr(result, f.name)) for f in dataclasses.fields(result)})
    if return_result or return_logprobs:
        if not return_logprobs:
            result = dataclasses.replace(result, logprobs=None, sampling_logprobs=None, top_ids=None,
                                         top_logprobs=None)
        return result
    return jax.device_put(result.tokens)


def _speculative_hook(model, assistant, device_batch, *, single, p, max_len, return_result, refused, **kwargs):
    from .speculative import speculative_decode

    for name, value in refused.items():
        if value not in (None, False, sample_step):
            raise TypeError(f"generate: {name}= is not supported with assistant= (speculative decoding)")
    tokens, lengths, accepted, calls = speculative_decode(model, assistant, device_batch, p=p, max_len=max_len,
                                                          **kwargs)
    result = GenerationResult(tokens=tokens, lengths=lengths, prefilled=p, cache_slots=max_len,
                              accepted_per_call=accepted, target_calls=calls)
    if single:
        result = dataclasses.replace(result, tokens=np.asarray(result.tokens[0]), lengths=np.asarray(result.lengths[0]))
    return result if return_result else jax.device_put(result.tokens)


def run_decode(model, state: DecodeState, first: Choice, params: SamplingParams, *, max_new_tokens: int,
               streamer=None, step: Callable = sample_step, pad_id: int = 0, chunk: int = DECODE_CHUNK
               ) -> tuple[GenerationResult, DecodeState]:
    """The host loop: decode chunks until every row is done (or Ctrl-C), collecting the choices in numpy.
    Returns the result and the final state (its cache holds the prompt and every token fed back)."""
    host = lambda c: jax.tree.map(np.asarray, c)
    pieces = [jax.tree.map(lambda x: x[:, None], host(first))]
    if streamer is not None:
        streamer(pieces[0].token[:, 0])
    produced = 1
    interrupted = False
    with _Interrupt() as ctrl_c:
        while produced < max_new_tokens and not bool(np.asarray(state.done).all()):
            if ctrl_c.hit:
                break
            steps = 1 if streamer is not None else min(chunk, max_new_tokens - produced)
            state, out, n = decode_chunk(model, state, params, np.int32(steps), step=step, size=chunk)
            n = int(n)
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
    return GenerationResult(tokens=tokens, lengths=lengths, logprobs=padded(cat.logprob, 0.0),
                            sampling_logprobs=padded(cat.sampling_logprob, 0.0), top_ids=padded(cat.top_ids, 0),
                            top_logprobs=padded(cat.top_logprobs, 0.0), interrupted=interrupted), state
