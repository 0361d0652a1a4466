"""The dict returned by every processor, and the small shared input helpers."""

from __future__ import annotations

from typing import Any

import numpy as np


class BatchFeature(dict):
    """A dict of outputs (numpy arrays and lists) that also allows `batch.input_ids`, like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no key {name!r}; keys are {sorted(self)}") from None

    @property
    def data(self) -> dict:
        return dict(self)


def check_return_tensors(return_tensors: str | None) -> None:
    if return_tensors not in (None, "np"):
        raise ValueError(
            f"return_tensors={return_tensors!r} is not supported: gemma4_eqx returns numpy arrays "
            "(return_tensors='np' or None); convert them with jnp.asarray(...) where you need JAX arrays."
        )


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def stack_or_empty(arrays: list[np.ndarray], tail_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.stack that returns an empty [0, *tail_shape] array for an empty list."""
    if not arrays:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.stack(arrays).astype(dtype, copy=False)
