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
- **Cache.** `max_len` = `inputs.cache_bucket(P + max_new_tokens)`: the next power of two >= max(P + max_new_tokens,
  256) up to 1,024 slots, above that the next multiple of an eighth of the next power of two (capped at the model's
  context).
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

Soft prompts and steering. `inputs_embeds=` `[seq, hidden]` (or `[batch, seq, hidden]`, left-padded with an
`attention_mask`) prefills given embeddings instead of embedding `prompt_ids` (as `model(inputs_embeds=...)`: with
`prompt_ids` too, the ids give the token types and the media are spliced in at their placeholders), bucketed and
padded like a prompt of ids, so new embeddings of the same length compile nothing. `taps=g4.Taps(...)` applies to
the prompt and every generated token: `add=` / `patch=` write one vector per layer (`values` `[writes, hidden]`,
or `[batch, writes, hidden]` one set per row) at every position; `residual=` / `attention=` reads of the position
that chose each token come back in `GenerationResult.residual` / `.attention` (with `return_result=True`). The
taps' layers are static (one program per layer set), their values traced; `taps=None` runs the same programs as
before taps existed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from ..config.generation import GenerationConfig
from ..model.decode import prefill_chunks
from ..model.masks import TokenType
from ..model.taps import Taps
from ..model.taps import check as check_taps
from .batching import TOKEN_FIELDS
from .inputs import as_batch, cache_bucket, check_padding, check_prompt_ids, pad_rows, prompt_bucket, reject_unknown
from .loop import GenerationResult, prefill_rows, run_decode, sample_step
from .settings import SamplingSettings, check_cache_dtype, check_max_new_tokens, check_num_draft_tokens
from .speculative import speculative_decode


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
    inputs_embeds=None,
    taps: Taps | None = None,
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

    `inputs_embeds` (soft prompts; `[seq, hidden]` or `[batch, seq, hidden]`, the model's dtype): the prompt's
    embeddings (what `model.embed` returns) in place of embedding `prompt_ids`, which may then be omitted (a text
    prompt; `mm_token_type_ids` may mark image tokens) or given alongside (same shape without hidden: they give
    the token types, and media are spliced in at their placeholders). `taps` (`g4.Taps`): steer with `add=` /
    `patch=` (values `[writes, hidden]` or `[batch, writes, hidden]`, no `where`: every prompt and generated token
    is written) and read `residual=` / `attention=` of the position that chose each token into
    `GenerationResult.residual` `[batch, new, reads, hidden]` / `.attention` `[batch, new, reads, heads,
    cache_slots]` (needs `return_result=True`). See the module docstring.
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
    media = reject_unknown(media)
    if prompt_ids is None and inputs_embeds is None:
        raise TypeError("generate: prompt_ids (or input_ids, or inputs_embeds) is required")
    hidden = model.config.text.hidden_size
    embeds = None
    if inputs_embeds is not None:
        embeds = np.asarray(inputs_embeds)
        if embeds.ndim not in (2, 3) or embeds.shape[-1] != hidden:
            raise ValueError(f"inputs_embeds: expected shape [seq, {hidden}] or [batch, seq, {hidden}] (hidden_size "
                             f"{hidden} last), found {list(embeds.shape)}")
        if embeds.dtype != model.dtype:
            raise ValueError(f"inputs_embeds: expected the model's activation dtype {jnp.dtype(model.dtype).name}, "
                             f"found {embeds.dtype} (cast with .astype(model.dtype))")
        if prompt_ids is None and any(v is not None for v in media.values()):
            raise ValueError(f"{', '.join(k for k, v in media.items() if v is not None)}: media with inputs_embeds "
                             "need prompt_ids to say which rows are their placeholders (or splice them yourself: "
                             "model.embed(ids, media=...))")
        if assistant is not None:
            raise TypeError("generate: inputs_embeds= is not supported with assistant= (speculative decoding)")
    if taps is not None and taps.empty:
        taps = None
    if taps is not None and assistant is not None:
        raise TypeError("generate: taps= is not supported with assistant= (speculative decoding)")

    cfg = model.config
    settings = SamplingSettings.resolve(cfg, generation_config, temperature=temperature, top_k=top_k, top_p=top_p,
                                        stop_ids=stop_ids, suppress_ids=suppress_ids, pad_id=pad_id,
                                        do_sample=do_sample)
    pad_id = settings.pad_id
    cache_dtype = check_cache_dtype(cache_dtype, model.dtype)

    if prompt_ids is None:  # inputs_embeds alone: stand-in ids (text), every position real unless masked
        prompt_ids = np.full(embeds.shape[:-1], pad_id, np.int32)
        if attention_mask is None:
            attention_mask = np.ones(embeds.shape[:-1], bool)
    ids = np.asarray(prompt_ids)
    if embeds is not None and ids.shape != embeds.shape[:-1]:
        raise ValueError(f"prompt_ids: expected shape {list(embeds.shape[:-1])} like inputs_embeds without its hidden "
                         f"axis, found {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt_ids: expected integer token ids, found dtype {ids.dtype}")
    single = ids.ndim == 1
    if ids.ndim not in (1, 2):
        raise ValueError(f"prompt_ids: expected [seq] or [batch, seq], found shape {list(ids.shape)}")
    if 0 in ids.shape:
        raise ValueError(f"prompt_ids: expected at least one token (and one row), found shape {list(ids.shape)}")
    if max_length is not None:
        if max_new_tokens is not None:
            raise TypeError("generate: give max_new_tokens or max_length (prompt + new), not both")
        max_new_tokens = int(max_length) - ids.shape[-1]
        if max_new_tokens <= 0:
            raise ValueError(f"max_length: {max_length} leaves no room after a prompt of {ids.shape[-1]} tokens")
    max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
    context = cfg.text.max_position_embeddings
    max_new_tokens = check_max_new_tokens(max_new_tokens, prompt_length=ids.shape[-1], context=context)
    if assistant is not None:
        num_draft_tokens = check_num_draft_tokens(num_draft_tokens, prompt_length=ids.shape[-1], context=context)
    settings.require_key(key)
    if prefill_chunk_size is not None and prefill_chunk_size <= 0:
        raise ValueError(f"prefill_chunk_size: expected a positive number of tokens, found {prefill_chunk_size}")
    key = jax.random.key(0) if key is None else key

    if single:
        ids = ids[None]
        embeds = None if embeds is None else embeds[None]
        attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
        positions = None if positions is None else np.asarray(positions)[None]
        token_types = None if token_types is None else np.asarray(token_types)[None]
        media = {k: np.asarray(v)[None] for k, v in media.items() if v is not None}
    for name, value in (("attention_mask", attention_mask), ("positions", positions),
                        ("mm_token_type_ids", token_types)):
        if value is not None and np.shape(value) != ids.shape:
            raise ValueError(f"{name}: expected shape {list(ids.shape)} like prompt_ids, found {list(np.shape(value))}")
    check_padding(ids, None if attention_mask is None else np.asarray(attention_mask, bool), pad_id)
    if embeds is None:
        check_prompt_ids(model, ids, media)
    if token_types is None and np.isin(ids, (cfg.image_token_id, cfg.video_token_id)).any():
        # as the model does: image / video placeholders make bidirectional blocks (and a whole-prompt prefill)
        token_types = np.zeros(ids.shape, np.int32)
        for kind, token_id in ((TokenType.IMAGE, cfg.image_token_id), (TokenType.VIDEO, cfg.video_token_id),
                               (TokenType.AUDIO, cfg.audio_token_id)):
            token_types = np.where(ids == token_id, int(kind), token_types)
    batch = as_batch(model, ids, attention_mask, positions, {"mm_token_type_ids": token_types, **media})
    types = batch.get("mm_token_type_ids")
    has_vision = types is not None and bool(np.isin(types, (TokenType.IMAGE, TokenType.VIDEO)).any())
    b, seq = batch["input_ids"].shape

    if prefill_chunk_size is not None and has_vision:
        p, chunk = seq, None
        bounds = tuple(prefill_chunks(types, seq, prefill_chunk_size))
    else:
        p, chunk = prompt_bucket(seq, has_vision, prefill_chunk_size)
        bounds = None
    padded = pad_rows(batch, p, pad_id, has_vision)
    spec_room = 0 if assistant is None else int(num_draft_tokens) + 1  # speculative: room for a verify chunk
    max_len = cache_bucket(p + max_new_tokens + spec_room, cfg.text.max_position_embeddings + p - seq + spec_room)
    # the chunked loop slices [start, start + chunk) of the token fields: give them the cache's length
    if bounds is None and chunk != p:
        padded = {k: (np.pad(v, [(0, 0), (0, max_len - p)]) if k in TOKEN_FIELDS else v) for k, v in padded.items()}
    if "mm_token_type_ids" in padded and not has_vision:
        padded.pop("mm_token_type_ids")  # no vision block: keep the text-only program (banded sliding attention)
    if embeds is not None:  # placed like the token fields: left-padded to p (and right-padded as they are)
        width = padded["input_ids"].shape[1]
        placed = np.zeros((b, width, hidden), embeds.dtype)
        placed[:, p - seq:p] = embeds
        padded["inputs_embeds"] = placed
    taps_kw = {} if taps is None else {"taps": _batched_taps(model, taps, b, return_result or return_logprobs)}
    params = settings.params()
    device_batch = jax.device_put(padded)  # a transfer; jnp.asarray would compile a copy per shape
    if assistant is not None:  # speculative decoding (speculative.py)
        return _speculative_hook(model, assistant, device_batch, single=single, p=p, chunk=chunk, bounds=bounds,
                                 max_len=max_len, max_new_tokens=max_new_tokens, key=key, params=params,
                                 num_draft_tokens=num_draft_tokens, mask_mode=mask_mode,
                                 cache_dtype=cache_dtype, raw_keys=cache_raw_keys,
                                 return_result=return_result, refused=dict(streamer=streamer, step=step,
                                                                           return_logprobs=return_logprobs))
    state, first = prefill_rows(model, None, device_batch, np.int32(p // chunk if chunk else 0),
                            np.int32(max_new_tokens), key, params, chunk=chunk, bounds=bounds, max_len=max_len,
                            mask_mode=mask_mode, cache_dtype=cache_dtype,
                            raw_keys=cache_raw_keys, **taps_kw)
    result, _ = run_decode(model, state, first, params, max_new_tokens=max_new_tokens, streamer=streamer, step=step,
                           pad_id=int(pad_id), **taps_kw)
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


def _batched_taps(model, taps: Taps, b: int, returns_result: bool) -> Taps:
    """`taps` checked for generation (before anything is traced) with one row of values per prompt."""
    t = model.config.text
    if taps.where is not None:
        raise ValueError("taps.where: generate writes at every prompt and generated token; give values [writes, "
                         "hidden] without where")
    if taps.reads and not returns_result:
        raise ValueError("taps: residual / attention reads come back in a GenerationResult; pass return_result=True")
    values = taps.values
    if values is not None:
        w = len(taps.written)
        shape = tuple(values.shape)
        if shape not in ((w, t.hidden_size), (b, w, t.hidden_size)):
            raise ValueError(f"taps.values: expected shape [{w}, {t.hidden_size}] (one vector per written layer) or "
                             f"[{b}, {w}, {t.hidden_size}] (one set per prompt row), found {list(shape)}")
        check_taps(Taps(residual=taps.residual, attention=taps.attention, patch=taps.patch, add=taps.add,
                        values=values[0] if values.ndim == 3 else values), model.layers, 1, t.hidden_size,
                   model.dtype)
        if values.ndim == 2:  # one set for every row; in NumPy, so that nothing is compiled for it
            values = np.broadcast_to(np.asarray(values), (b,) + shape)
    else:
        check_taps(taps, model.layers, 1, t.hidden_size, model.dtype)
    return Taps(residual=taps.residual, attention=taps.attention, patch=taps.patch, add=taps.add, values=values)


def _speculative_hook(model, assistant, device_batch, *, single, p, max_len, return_result, refused, **kwargs):
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
