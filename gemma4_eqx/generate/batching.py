"""From transformers-style batches to per-sequence inputs, and back to a `vmap`-able stack.

transformers stacks the media of a whole batch (`pixel_values [N_images, patches, patch_dim]`, images in
row-major (sample, position) order; likewise video frames and audio clips). The Equinox model takes one
sequence at a time, so `split_batch` hands each sample its own media, found by counting its placeholder tokens,
and `stack_samples` pads per-sample media to a common count with all-padding items (positions (-1, -1), mask
False) so the samples can go through `jax.vmap`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Gemma4Config

TOKEN_FIELDS = ("input_ids", "attention_mask", "positions", "mm_token_type_ids")
MEDIA = (  # (placeholder attribute, per-item arrays, how an item's soft-token count is found)
    ("image_token_id", ("pixel_values", "image_position_ids"), "image_position_ids"),
    ("video_token_id", ("pixel_values_videos", "video_position_ids"), "video_position_ids"),
    ("audio_token_id", ("input_features", "input_features_mask"), "input_features_mask"),
)


def soft_tokens(field: str, item: np.ndarray) -> int:
    if field.endswith("position_ids"):
        return int(np.all(item != -1, axis=-1).sum())
    return int(item.sum())


def split_batch(batch: dict[str, Any], config: Gemma4Config) -> list[dict[str, np.ndarray]]:
    """One dict of model keyword arguments per sample (`position_ids` is renamed `positions`)."""
    batch = {("positions" if k == "position_ids" else k): v for k, v in batch.items() if v is not None}
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], found shape {list(ids.shape)}")
    samples: list[dict[str, np.ndarray]] = [
        {k: np.asarray(batch[k])[b] for k in TOKEN_FIELDS if k in batch} for b in range(ids.shape[0])]
    for token_attr, fields, count_field in MEDIA:
        if fields[0] not in batch:
            continue
        items = {f: np.asarray(batch[f]) for f in fields}
        counts = [soft_tokens(count_field, it) for it in items[count_field]]
        token = getattr(config, token_attr)
        cursor = 0
        for b, sample in enumerate(samples):
            need, take = int((ids[b] == token).sum()), 0
            start = cursor
            while take < need and cursor < len(counts):
                take += counts[cursor]
                cursor += 1
            if take != need:
                raise ValueError(f"{fields[0]}: sample {b} has {need} placeholder tokens but the next items give "
                                 f"{take} soft tokens")
            if cursor > start:
                for f in fields:
                    sample[f] = items[f][start:cursor]
        if cursor != len(counts):
            raise ValueError(f"{fields[0]}: {len(counts) - cursor} items are left over after every placeholder "
                             "was filled")
    return samples


def _pad_items(arrays: list[np.ndarray], field: str) -> np.ndarray:
    n = max(a.shape[0] for a in arrays)
    out = []
    for a in arrays:
        fill = -1 if field.endswith("position_ids") else 0
        pad = np.full((n - a.shape[0],) + a.shape[1:], fill, a.dtype)
        out.append(np.concatenate([a, pad]))
    return np.stack(out)


def stack_samples(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-sample inputs for `jax.vmap`; samples lacking a medium get all-padding items."""
    out: dict[str, np.ndarray] = {}
    keys = {k for s in samples for k in s}
    for k in TOKEN_FIELDS:
        if k in keys:
            out[k] = np.stack([s[k] for s in samples])
    for _, fields, _ in MEDIA:
        if fields[0] not in keys:
            continue
        for f in fields:
            like = next(s[f] for s in samples if f in s)
            arrays = [s.get(f, np.zeros((0,) + like.shape[1:], like.dtype)) for s in samples]
            if max(a.shape[0] for a in arrays) == 0:
                continue
            # a sample without this medium still needs one (all padding) item so shapes agree
            arrays = [a if a.shape[0] else np.full((1,) + like.shape[1:], -1 if f.endswith("position_ids") else 0,
                                                   like.dtype) for a in arrays]
            out[f] = _pad_items(arrays, f)
    return out
