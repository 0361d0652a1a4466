"""Layer kinds and the repeating layer pattern the decoder stack and the KV cache share."""

from __future__ import annotations

import enum
from typing import Any

from ..config import FULL, SLIDING


class LayerKind(enum.StrEnum):
    """A decoder layer's attention kind; equal to transformers' `layer_types` strings."""

    SLIDING = SLIDING
    FULL = FULL


def layer_pattern(layer_types: tuple[str, ...]) -> tuple[tuple[LayerKind, int], ...]:
    """The shortest repeating period of `layer_types`, as runs `(kind, length)`."""
    return _pattern(layer_types)[0]


def layer_repeats(layer_types: tuple[str, ...]) -> int:
    """How many times the period of `layer_pattern` repeats."""
    return _pattern(layer_types)[1]


def _pattern(layer_types: tuple[str, ...]) -> tuple[tuple[tuple[LayerKind, int], ...], int]:
    n = len(layer_types)
    period = next(p for p in range(1, n + 1) if n % p == 0 and layer_types == layer_types[:p] * (n // p))
    runs: list[list[Any]] = []
    for t in layer_types[:period]:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return tuple((LayerKind(t), c) for t, c in runs), n // period
