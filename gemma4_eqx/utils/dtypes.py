"""Dtype names as transformers writes them in `config.json`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def dtype_name(dtype: Any) -> str:
    """The name transformers writes as `config.json`'s `dtype` ("bfloat16", "float32", ...)."""
    return {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float32): "float32",
            np.dtype(np.float16): "float16"}.get(np.dtype(dtype), str(np.dtype(dtype)))
