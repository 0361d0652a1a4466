"""Dtype names as transformers writes them in `config.json`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def dtype_name(dtype: Any) -> str:
    """The name transformers writes as `config.json`'s `dtype` ("bfloat16", "float32", ...)."""
    return {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float32): "float32",
            np.dtype(np.float16): "float16"}.get(np.dtype(dtype), str(np.dtype(dtype)))


# The dtypes a KV cache (or any float activation buffer) may take: a narrower float loses keys, an integer dtype
# truncates them (int8 codes with scales are a cache kind of their own: `KVCache.init(..., int8=True)`).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def float_dtype(value: Any, name: str, hint: str = "") -> np.dtype:
    """`value` as a dtype if it is one of `FLOAT_DTYPES`; else ValueError naming `name`, what was expected and what
    was found (`hint` is appended, e.g. where int8 codes are asked for)."""
    try:
        dtype = None if value is None else np.dtype(value)  # np.dtype(None) would be float64
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in FLOAT_DTYPES or isinstance(value, bool):
        found = value if isinstance(value, str) else getattr(value, "__name__", None) or getattr(dtype, "name", None)
        raise ValueError(f"{name}: expected a floating-point dtype ({', '.join(FLOAT_DTYPES)}), found "
                         f"{found if found is not None else repr(value)[:60]}" + (f"; {hint}" if hint else ""))
    return dtype
