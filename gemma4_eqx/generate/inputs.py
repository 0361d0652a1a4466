"""The inputs of `generate` and `score`: a processor batch turned into per-row arrays, checked before anything is
traced, and padded to coarse shapes so that few programs are compiled (the "buckets": `generate.generation`'s
docstring), plus transformers' keywords accepted under our names or refused by name."""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any

import numpy as np

from .batching import split_batch, stack_samples

PREFILL_CHUNKS = (1, 8, 64, 512, 4096)  # text prompts: chunk size = the largest not above the prompt length
MIN_CACHE = 256  # smallest cache bucket (slots)
FINE_CACHE = 1024  # above this many slots, cache buckets grow by eighths of a doubling (`cache_bucket`)
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
    """Cache slots for sequences of up to `needed` slots, capped at `context` (never below `needed`): powers of two
    from `MIN_CACHE` up to `FINE_CACHE`, then multiples of an eighth of the next power of two (4,225 -> 5,120, where
    the powers of two alone gave 8,192). Above `FINE_CACHE` every full layer's attention reads at most a quarter
    more slots than the request holds; below it, where a doubling costs little, few buckets keep `generate`
    compiling once for the common short requests (four more buckets per doubling above)."""
    n = max(needed, MIN_CACHE)
    step = next_pow2(n) if n <= FINE_CACHE else next_pow2(n) // 8
    return max(needed, min(-(-n // step) * step, context))


def is_ordered(model) -> bool:
    """Whether log-probs go through `sampling.ordered_log_softmax` (a model under `numerics="invariant"`)."""
    numerics = model.numerics
    return getattr(numerics, "name", numerics) == "invariant"


def reject_unknown(kwargs: dict) -> dict:
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


def as_batch(model, ids: np.ndarray, attention_mask, positions, media: dict) -> dict[str, np.ndarray]:
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


def check_prompt_ids(model, ids: np.ndarray, media: dict) -> None:
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


def check_padding(ids: np.ndarray, mask: np.ndarray | None, pad_id: int) -> None:
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


def pad_rows(batch: dict, p: int, pad_id: int, has_vision: bool) -> dict:
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
