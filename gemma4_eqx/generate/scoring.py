"""`g4.score`: per-token log-likelihoods and perplexity of given continuations (lm-eval's `loglikelihood`).

Each row is a prompt (the context, never scored) followed by a continuation (the scored tokens). Token `t` of a
continuation gets `log_softmax(logits)[t]` of the model's soft-capped logits at the position before it, exactly
the log-softmax of `model(prompt + continuation)` gathered at the targets (padding aside, see below). Prompts may
hold images, video and audio (the media keywords of `g4.generate`); continuations are text.

What is compiled, and for which shapes: rows are sorted by length and scored `batch_size` at a time. Each group
is left-padded as `g4.generate` pads a prompt (`generation.prompt_bucket`: a text row of L tokens to a
multiple of the chunk size below L, at most 2L; a row with image or video soft tokens to the next power of two),
media to power-of-two item counts (and patch / frame counts), and a short last group is filled up with copies of
its first row, so one program serves every group whose (padded length, continuation bucket, media shapes)
agree (prompts given as `inputs_embeds` are placed, and padded with zeros, where their ids would be). Only the
last `width` positions go through the tied head (`width`: the next power of two >= the group's
longest continuation, at least 8), so no `[seq, vocab]` logits are built for the prompt. Left padding changes
no result (pads are masked keys before every real token, and positions count real tokens only), up to XLA
choosing other kernels for another shape (fp32: a few 1e-6 in the log-probs; fp64: ~1e-15).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..model.masks import MASK_MODES
from .batching import MEDIA as _MEDIA_SPECS
from .batching import soft_tokens, split_batch, stack_samples
from .inputs import MEDIA_FIELDS, is_ordered, next_pow2, pad_rows, prompt_bucket
from .sampling import ordered_log_softmax

# dimensions of one item of each medium ([patches, patch_dim] per image, ...), and what the arrays hold
_ITEM_NDIM = {"pixel_values": 2, "image_position_ids": 2, "pixel_values_videos": 2, "video_position_ids": 2,
              "input_features": 2, "input_features_mask": 1}
_KIND = {"pixel_values": "f", "pixel_values_videos": "f", "input_features": "f",
         "image_position_ids": "i", "video_position_ids": "i", "input_features_mask": "b"}
MIN_WIDTH = 8  # the head runs over the last next_pow2(max(longest continuation, 8)) positions of a group
_KIND_WORDS = {"f": "floating point", "i": "integer", "b": "boolean"}


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Scores of N continuations. Arrays are `[N, C]` (C = the longest continuation; `[C]` for a single row):
    entry `[i, t]` is token `t` of continuation `i`, valid where `mask` is True (zeros after a row's end).

    `logprobs`: log-softmax of the model's logits at each continuation token; `greedy`: the token is the argmax
    (the first maximum, as lm-eval's `is_greedy` reads it); `padded_length`: the length each row was run at.
    With `score(..., top_logprobs=k)`: `top_ids`, `top_logprobs` `[N, C, k]`, the k most likely tokens at each
    continuation token's position and their log-probs, from the same log-softmax (an OpenAI `echo` +
    `logprobs` answer); else None.
    """

    logprobs: np.ndarray
    mask: np.ndarray
    greedy: np.ndarray
    padded_length: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @property
    def count(self) -> np.ndarray:
        """Scored tokens per row (the continuation's length)."""
        return np.asarray(self.mask.sum(-1))

    @property
    def sum(self) -> np.ndarray:
        """Total log-likelihood of each continuation (lm-eval's `loglikelihood`)."""
        return np.asarray(np.where(self.mask, self.logprobs, 0.0).sum(-1))

    @property
    def mean(self) -> np.ndarray:
        """Mean log-likelihood per token of each continuation."""
        return np.asarray(self.sum / self.count)

    @property
    def perplexity(self) -> np.ndarray:
        """exp(-mean log-likelihood) of each continuation."""
        return np.asarray(np.exp(-self.mean))

    @property
    def is_greedy(self) -> np.ndarray:
        """Each continuation is what greedy decoding produces after its prompt (every token the argmax)."""
        return np.asarray(np.where(self.mask, self.greedy, True).all(-1))

    @property
    def corpus_perplexity(self) -> float:
        """exp(-(sum of every log-likelihood) / (number of scored tokens)): every token weighs the same."""
        return float(np.exp(-np.sum(self.sum) / np.sum(self.count)))


# ---- inputs ------------------------------------------------------------------------------------------
def _is_token_row(x) -> bool:
    """A flat sequence of token ids (one row) rather than a sequence of rows."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.ndim(x) == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, (int, np.integer)) for v in x)


def _rows(name: str, value) -> tuple[list[np.ndarray], bool]:
    """(rows as 1-D int arrays, whether a single row was given)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected token ids (tokenize the text first: proc.tokenizer(...)), found a string")
    single = _is_token_row(value)
    if single:
        value = [value]
    elif isinstance(value, (np.ndarray, jax.Array)):
        if np.ndim(value) != 2:
            raise ValueError(f"{name}: expected one row of token ids [seq], rows [n, seq] or a list of rows, found "
                             f"shape {list(np.shape(value))}")
        value = list(np.asarray(value))
    elif not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected token ids or a list of rows of token ids, found {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: no rows given")
    out = []
    for i, row in enumerate(value):
        try:
            arr = np.asarray(row)
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: not a flat sequence of token ids ({e})") from None
        if arr.size == 0:
            what = ("an empty continuation has no token to score" if name == "continuations" else
                    "the first continuation token needs a context: start the prompt with <bos>")
            raise ValueError(f"{name}[{i}]: empty; {what}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name}[{i}]: expected integer token ids, found dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"{name}[{i}]: expected a 1-D row of token ids, found shape {list(arr.shape)}")
        out.append(arr.astype(np.int32))
    return out, single


def _row_media(n: int, ids: list[np.ndarray], media: dict[str, Any], config) -> list[dict[str, np.ndarray]]:
    """Each row's media arrays. A field may be transformers' stack over every row's items (`[items, ...]`, split
    by counting each row's placeholders), a per-row stack (`[n, items, ...]`) or a list of n arrays (None = the
    row has none of this medium)."""
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    flat: dict[str, np.ndarray] = {}
    for k, v in media.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise ValueError(f"{k}: a list of per-row arrays needs one entry per row ({n}), found {len(v)}")
            for i, item in enumerate(v):
                if item is not None:
                    item = np.asarray(item)
                    if item.ndim != _ITEM_NDIM[k] + 1:
                        raise ValueError(f"{k}[{i}]: expected [items, ...] with {_ITEM_NDIM[k] + 1} dimensions, "
                                         f"found shape {list(item.shape)}")
                    rows[i][k] = item
            continue
        arr = np.asarray(v)
        if arr.ndim == _ITEM_NDIM[k] + 1:
            flat[k] = arr
        elif arr.ndim == _ITEM_NDIM[k] + 2 and arr.shape[0] == n:
            for i in range(n):
                rows[i][k] = arr[i]
        else:
            raise ValueError(f"{k}: expected every row's items stacked [items, ...] ({_ITEM_NDIM[k] + 1} dimensions), "
                             f"per row [{n}, items, ...] or a list of {n} arrays; found shape {list(arr.shape)}")
    if flat:
        width = max(len(r) for r in ids)
        grid = np.zeros((n, width), np.int32)  # right-padded with id 0 (never a placeholder): only counted here
        for i, r in enumerate(ids):
            grid[i, :len(r)] = r
        for i, sample in enumerate(split_batch({"input_ids": grid, **flat}, config)):
            rows[i].update({k: v for k, v in sample.items() if k in flat})
    for k in media:
        for i, row in enumerate(rows):
            if k in row and row[k].dtype.kind not in _KIND[k]:
                raise TypeError(f"{k}: expected {_KIND_WORDS[_KIND[k]]} values, found dtype {row[k].dtype} (row {i})")
    for token_attr, (values, where), _ in _MEDIA_SPECS:
        token = getattr(config, token_attr)
        for i, (row, r) in enumerate(zip(rows, ids)):
            need = int((r == token).sum())
            if (values in row) != (where in row):
                missing = where if values in row else values
                raise ValueError(f"{missing}: row {i} has {values if values in row else where} but not {missing}")
            have = 0 if values not in row else sum(soft_tokens(where, item) for item in row[where])
            if need != have:
                raise ValueError(f"{values}: prompt {i} holds {need} placeholder tokens but its media give {have} "
                                 "soft tokens" + (" (pass the processor's media arrays)" if not have else ""))
    return rows


def _pad_axis1(arrays: list[np.ndarray], field: str) -> list[np.ndarray]:
    """Pad every row's items along axis 1 (patches, frames) to one power-of-two count."""
    if not arrays or arrays[0].ndim < 2:
        return arrays
    size = next_pow2(max(a.shape[1] for a in arrays))
    fill = -1 if field.endswith("position_ids") else 0
    return [np.pad(a, [(0, 0), (0, size - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
            for a in arrays]


def _embed_rows(model, value) -> tuple[list[np.ndarray], bool]:
    """(rows of prompt embeddings `[seq_i, hidden]` as numpy arrays, whether a single row was given)."""
    hidden = model.config.text.hidden_size
    single = not isinstance(value, (list, tuple)) and np.ndim(value) == 2
    rows = [value] if single else (list(value) if isinstance(value, (list, tuple)) else
                                   [value[i] for i in range(np.shape(value)[0])] if np.ndim(value) == 3 else None)
    if rows is None:
        raise ValueError(f"inputs_embeds: expected [seq, {hidden}], [n, seq, {hidden}] or a list of [seq_i, {hidden}] "
                         f"arrays, found shape {list(np.shape(value))}")
    out = []
    for i, row in enumerate(rows):
        row = np.asarray(row)
        if row.ndim != 2 or row.shape[1] != hidden or row.shape[0] == 0:
            raise ValueError(f"inputs_embeds[{i}]: expected shape [seq, {hidden}] (seq >= 1, hidden_size {hidden}), "
                             f"found {list(row.shape)}")
        if row.dtype != model.dtype:
            raise ValueError(f"inputs_embeds[{i}]: expected the model's activation dtype "
                             f"{jnp.dtype(model.dtype).name}, found {row.dtype} (cast with .astype(model.dtype))")
        out.append(row)
    return out, single


# ---- the compiled part --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("width", "mask_mode", "top"))
def _score_rows(model, batch: dict, *, width: int, mask_mode: str, top: int = 0):
    """Log-probs and argmax flags of the last `width` tokens of every (left-padded) row (and with `top`, the
    `top` largest log-probs and their ids at each of those positions)."""
    ordered = is_ordered(model)

    def one(row):
        row = dict(row)
        ids = row.pop("input_ids")
        seq = ids.shape[0]
        if "inputs_embeds" not in row:
            h = model.hidden_states(ids, mask_mode=mask_mode, **row)[seq - 1 - width:seq - 1]
        else:  # the prompt's rows given, the rest embedded from the ids; media spliced at the ids' placeholders
            given, embeds = row.pop("embeds_given"), row.pop("inputs_embeds")
            embeds = jnp.where(given[:, None], embeds, model.embed(ids, validate=False))
            media = any(k in row for k in MEDIA_FIELDS)
            h = model.hidden_states(ids if media else None, inputs_embeds=embeds, mask_mode=mask_mode,
                                    **row)[seq - 1 - width:seq - 1]
        logits = model.logits_from_hidden(h)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        logp = ordered_log_softmax(logits) if ordered else jax.nn.log_softmax(logits, axis=-1)
        targets = ids[seq - width:]
        picked = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        if top:
            values, ids_top = jax.lax.top_k(logp, top)
            return picked, jnp.argmax(logits, axis=-1) == targets, values, ids_top.astype(jnp.int32)
        return picked, jnp.argmax(logits, axis=-1) == targets

    return jax.vmap(one)(batch)


# ---- score -------------------------------------------------------------------------------------------
def score(
    model,
    prompts,
    continuations,
    *,
    batch_size: int = 8,
    mask_mode: str = "intended",
    inputs_embeds=None,
    top_logprobs: int = 0,
    **media,
) -> ScoreResult:
    """Log-likelihood of each continuation given its prompt, token by token.

    `prompts`, `continuations`: one row of token ids each (1-D), or n rows each (a list of 1-D sequences of any
    lengths, or `[n, seq]` arrays); integer ids, every row non-empty (start prompts with `<bos>`). Continuations
    are text (no image / video / audio placeholders); prompts may hold placeholders, with their media given as
    the keywords of `g4.generate` (`pixel_values`, `image_position_ids`, `pixel_values_videos`,
    `video_position_ids`, `input_features`, `input_features_mask`): transformers' stack of every row's items
    (`[items, ...]`, as the processor returns it for a batch), a per-row stack (`[n, items, ...]`) or a list of n
    arrays (None for a row without that medium).

    `batch_size`: rows per compiled call (groups of rows of similar length; see the module doc). `mask_mode`:
    as for `model(...)`. `top_logprobs=k`: also the k most likely tokens at each scored position
    (`ScoreResult.top_ids`, `top_logprobs`).

    `inputs_embeds`: the prompts as embeddings (soft prompts; what `model.embed` returns, in the model's dtype):
    one `[seq, hidden]` array, `[n, seq, hidden]` or a list of n `[seq_i, hidden]` arrays. `prompts` may then be
    None (text prompts), or give the ids of the same lengths (their placeholders get the media spliced in, and
    mark image blocks, as for ids alone). Continuations are always ids.

    Returns a `ScoreResult` (per-token `logprobs`, `mask`, `greedy`; `sum`, `count`, `perplexity`, `is_greedy`,
    `corpus_perplexity`) in the order given.
    """
    unknown = [k for k in media if k not in MEDIA_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], MEDIA_FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"media keywords are {', '.join(MEDIA_FIELDS)}"
        raise TypeError(f"score: unexpected keyword {unknown[0]!r}; {hint}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode: expected one of {MASK_MODES}, found {mask_mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size!r}")
    if (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer))
            or not 0 <= top_logprobs <= model.config.text.vocab_size):
        raise ValueError(f"top_logprobs: expected an integer in [0, {model.config.text.vocab_size}] (vocab_size), "
                         f"found {top_logprobs!r}")
    cfg = model.config
    embed_rows = None
    if inputs_embeds is not None:
        embed_rows, single_embeds = _embed_rows(model, inputs_embeds)
        if prompts is None:
            if any(v is not None for v in media.values()):
                raise ValueError(f"{', '.join(k for k, v in media.items() if v is not None)}: media with "
                                 "inputs_embeds need prompts (ids) to say which rows are their placeholders")
            prompts = [np.full(len(e), cfg.text.pad_token_id, np.int32) for e in embed_rows]
            prompts = prompts[0] if single_embeds else prompts
    prompt_rows, single = _rows("prompts", prompts)
    if embed_rows is not None and (len(embed_rows) != len(prompt_rows) or single != single_embeds or any(
            len(e) != len(r) for e, r in zip(embed_rows, prompt_rows))):
        raise ValueError(f"prompts, inputs_embeds: expected one [seq_i, hidden] row of embeddings per prompt of "
                         f"seq_i ids; found prompt lengths {[len(r) for r in prompt_rows]} and embedding shapes "
                         f"{[list(e.shape) for e in embed_rows]}")
    cont_rows, single_cont = _rows("continuations", continuations)
    if len(prompt_rows) != len(cont_rows) or single != single_cont:
        raise ValueError(f"prompts, continuations: {len(prompt_rows)} prompt(s) but {len(cont_rows)} "
                         "continuation(s); give one continuation per prompt")
    vocab, context = cfg.text.vocab_size, cfg.text.max_position_embeddings
    placeholders = np.array([cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id])
    for name, rows in (("prompts", prompt_rows), ("continuations", cont_rows)):
        for i, r in enumerate(rows):
            if r.min() < 0 or r.max() >= vocab:
                raise ValueError(f"{name}[{i}]: token ids must lie in [0, {vocab}) (vocab_size); found values in "
                                 f"[{int(r.min())}, {int(r.max())}]")
    for i, r in enumerate(cont_rows):
        if np.isin(r, placeholders).any():
            raise ValueError(f"continuations[{i}]: holds image / video / audio placeholder ids; a continuation is "
                             "scored text (put media in the prompt)")
    n = len(prompt_rows)
    ids = [np.concatenate([p, c]) for p, c in zip(prompt_rows, cont_rows)]
    for i, r in enumerate(ids):
        if len(r) > context:
            raise ValueError(f"prompts[{i}] + continuations[{i}]: {len(r)} tokens exceed the model's context of "
                             f"{context} (text_config.max_position_embeddings)")
    row_media = _row_media(n, ids, media, cfg)
    vision_ids = (cfg.image_token_id, cfg.video_token_id)

    n_cont = np.array([len(c) for c in cont_rows])
    width_all = int(n_cont.max())
    logprobs = np.zeros((n, width_all), np.float64 if model.dtype == jnp.float64 else np.float32)
    greedy = np.zeros((n, width_all), bool)
    padded = np.zeros((n,), np.int32)
    top_values = np.zeros((n, width_all, top_logprobs), logprobs.dtype)
    top_ids = np.zeros((n, width_all, top_logprobs), np.int32)
    order = sorted(range(n), key=lambda i: (len(ids[i]), i))
    b = min(batch_size, next_pow2(n))
    pad_id = cfg.text.pad_token_id
    for start in range(0, n, b):
        members = order[start:start + b]
        slots = members + [members[0]] * (b - len(members))  # a short group: filled with copies, ignored
        longest = max(len(ids[i]) for i in slots)
        vision = any(np.isin(ids[i], vision_ids).any() for i in slots)
        p, _ = prompt_bucket(longest, vision)
        width = min(next_pow2(max(int(n_cont[slots].max()), MIN_WIDTH)), p - 1)
        tokens = np.full((b, longest), pad_id, np.int32)
        mask = np.zeros((b, longest), bool)
        for k, i in enumerate(slots):
            tokens[k, longest - len(ids[i]):] = ids[i]
            mask[k, longest - len(ids[i]):] = True
        batch: dict[str, Any] = {"input_ids": tokens, "attention_mask": mask}
        if vision:
            types = np.zeros_like(tokens)
            for kind, token_id in ((1, cfg.image_token_id), (2, cfg.video_token_id), (3, cfg.audio_token_id)):
                types = np.where(tokens == token_id, kind, types)
            batch["mm_token_type_ids"] = types
        present = sorted({k for i in slots for k in row_media[i]})
        if present:
            samples = [{} for _ in slots]
            for k in present:
                have = [(j, row_media[i][k]) for j, i in enumerate(slots) if k in row_media[i]]
                for (j, _), a in zip(have, _pad_axis1([a for _, a in have], k)):
                    samples[j][k] = a
            batch.update(stack_samples(samples))
        batch = pad_rows(batch, p, pad_id, vision)
        if embed_rows is not None:  # placed where the prompt's ids are: after p - len(row) pads
            hidden = cfg.text.hidden_size
            batch["inputs_embeds"] = np.zeros((b, p, hidden), embed_rows[0].dtype)
            batch["embeds_given"] = np.zeros((b, p), bool)
            for k, i in enumerate(slots):
                start = p - len(ids[i])
                batch["inputs_embeds"][k, start:start + len(embed_rows[i])] = embed_rows[i]
                batch["embeds_given"][k, start:start + len(embed_rows[i])] = True
        out = _score_rows(model, jax.device_put(batch), width=width, mask_mode=mask_mode, top=int(top_logprobs))
        lp, hit = np.asarray(out[0]), np.asarray(out[1])
        for k, i in enumerate(members):
            c = n_cont[i]
            logprobs[i, :c] = lp[k, width - c:]
            greedy[i, :c] = hit[k, width - c:]
            padded[i] = p
            if top_logprobs:
                top_values[i, :c] = np.asarray(out[2][k, width - c:])
                top_ids[i, :c] = np.asarray(out[3][k, width - c:])
    valid = np.arange(width_all)[None] < n_cont[:, None]
    tops = dict(top_ids=top_ids, top_logprobs=top_values) if top_logprobs else {}
    result = ScoreResult(logprobs=logprobs, mask=valid, greedy=greedy & valid, padded_length=padded, **tops)
    if single:
        result = ScoreResult(logprobs=logprobs[0], mask=valid[0], greedy=greedy[0] & valid[0],
                             padded_length=np.asarray(padded[0]), **{k: v[0] for k, v in tops.items()})
    return result
