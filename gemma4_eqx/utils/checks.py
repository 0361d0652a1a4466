"""Input checks that give a clear message both eagerly and under `jax.jit`.

Eagerly (concrete values) a failed check raises `ValueError` with the numbers. Under a trace the same condition
goes through `eqx.error_if`, which raises when the compiled function runs.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np


def is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_shape(name: str, x, expected: tuple, what: str = "") -> None:
    """`expected` entries may be None (any size). Shapes are static, so this works under jit too."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        pretty = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {pretty}{' ' + what if what else ''}, found {list(shape)}")


def check_value(carrier, failed, message: Callable[[], str]):
    """Raise `message()` when `failed` holds; returns `carrier` (threaded through, as eqx.error_if wants)."""
    if is_concrete(failed):
        if bool(np.asarray(failed)):
            raise ValueError(message())
        return carrier
    return eqx.error_if(carrier, failed, message())
