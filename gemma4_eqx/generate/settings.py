"""Validation of the sampling and generation settings, shared by `generate`, `ChatSession`, speculative decoding,
the server and the CLI: one place that says what each setting may be."""

from __future__ import annotations

import math
import warnings


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
