"""Validation of the sampling and generation settings, shared by `generate`, `ChatSession`, speculative decoding,
the server and the CLI: one place that says what each setting may be.

    settings = SamplingSettings.resolve(model.config, generation_config, temperature=0.7)  # defaults filled, checked
    settings.require_key(key)          # sampling (temperature > 0) needs an explicit key
    params = settings.params()         # the traced `SamplingParams` the compiled loop takes
    max_new = check_max_new_tokens(64, prompt_length=12, context=model.config.text.max_position_embeddings)
    dtype = check_cache_dtype(cache_dtype, default=model.dtype)
    k = check_num_draft_tokens(4, prompt_length=12, context=...)
    slots = check_max_context(model.config, 4096, dtype=dtype, spare=256)   # fits the model and the memory

What each may be:
- `temperature`: a finite number >= 0 (0 = greedy).
- `top_k`: an integer >= 0, or None (0 or None: no top-k filter).
- `top_p`: a number in (0, 1], or None (1 or None: no nucleus filter).
- `stop_ids`, `pad_id`: token ids inside the vocabulary [0, vocab_size).
- `suppress_ids`: token ids; those outside the vocabulary are ignored with a warning, and they may not cover the
  whole vocabulary (nothing would be left to sample: a row of pad tokens).
- `max_new_tokens`: a positive integer; the prompt plus that many tokens fit the model's context.
- the cache dtype: a float dtype (`utils.dtypes.FLOAT_DTYPES`); int8 codes are the cache's own switch,
  `KVCache.init(..., int8=True)`.
- `num_draft_tokens` (speculative decoding): a positive integer; the verify chunk (pending token and k drafts)
  fits the model's context after the prompt.
- `max_context` (a chat session's or the server's cache slots): a positive integer, at most the model's context,
  and its KV cache (`model.cache.cache_bytes`) must fit the memory (`memory_bytes()`).

Every refusal is a `SettingsError` (a ValueError) naming the argument, what was expected and what was found, raised
before anything is compiled or allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any

import numpy as np

from ..config.generation import GenerationConfig
from ..model.cache import cache_bytes
from ..utils.dtypes import float_dtype
from .sampling import SamplingParams

# `generate(top_k=-1, top_p=-1.0)` (and ChatSession's, the server's): take the value from the generation config
TOP_K_FROM_CONFIG = -1
TOP_P_FROM_CONFIG = -1.0
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SettingsError(ValueError):
    """A sampling or generation setting outside what it may be; the message names the argument."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return np.ndim(value) == 0 and hasattr(value, "dtype") and np.issubdtype(np.asarray(value).dtype, np.integer)


def _is_real(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return (np.ndim(value) == 0 and hasattr(value, "dtype")
            and np.issubdtype(np.asarray(value).dtype, np.number) and not np.iscomplexobj(value))


# ---- one setting each ------------------------------------------------------------------------------------------
def check_temperature(value: Any, name: str = "temperature") -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise SettingsError(f"{name}: expected a finite number >= 0 (0 = greedy), found {_short(value)}")
    return float(value)


def check_top_k(value: Any, name: str = "top_k") -> int | None:
    if value is None:
        return None
    if not _is_int(value) or int(value) < 0:
        raise SettingsError(f"{name}: expected an integer >= 0 (0 or None = no top-k filter), found {_short(value)}")
    return int(value)


def check_top_p(value: Any, name: str = "top_p") -> float | None:
    if value is None:
        return None
    if not _is_real(value) or not (math.isfinite(float(value)) and 0.0 < float(value) <= 1.0):
        raise SettingsError(f"{name}: expected a number in (0, 1] (1 or None = no nucleus filter), found "
                            f"{_short(value)}")
    return float(value)


def check_token_ids(value: Any, name: str, vocab_size: int | None = None) -> tuple[int, ...]:
    """A sequence of integer token ids (a single id is taken as one), each in [0, vocab_size) when given."""
    if _is_int(value):
        value = (value,)
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise SettingsError(f"{name}: expected a sequence of integer token ids, found {_short(value)}")
    if hasattr(value, "dtype"):  # a numpy or jax array
        arr = np.asarray(value)
        if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
            raise SettingsError(f"{name}: expected a 1-D sequence of integer token ids, found an array of shape "
                                f"{list(arr.shape)} and dtype {arr.dtype}")
        ids = tuple(int(i) for i in arr.reshape(-1))
    else:
        try:
            items = list(value)
        except TypeError:
            raise SettingsError(f"{name}: expected a sequence of integer token ids, found {_short(value)}") from None
        bad = [i for i in items if not _is_int(i)]
        if bad:
            raise SettingsError(f"{name}: expected integer token ids, found {_short(bad[:5])}")
        ids = tuple(int(i) for i in items)
    if vocab_size is not None:
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            raise SettingsError(f"{name}: {_short(outside[:8])} lie outside the vocabulary [0, {vocab_size})")
    return ids


def check_pad_id(value: Any, vocab_size: int, name: str = "pad_id") -> int:
    if not _is_int(value) or not 0 <= int(value) < vocab_size:
        raise SettingsError(f"{name}: expected a token id in the vocabulary [0, {vocab_size}), found {_short(value)}")
    return int(value)


def check_suppress_ids(value: Any, vocab_size: int, name: str = "suppress_ids") -> tuple[int, ...]:
    """Integer ids; those outside the vocabulary are dropped with a warning (a generation_config.json written for
    a larger vocabulary); refused when the ids left cover the whole vocabulary."""
    ids = check_token_ids(value, name)
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        warnings.warn(f"{name}: {_short(outside[:8])} lie outside the vocabulary [0, {vocab_size}) and are ignored",
                      skip_file_prefixes=(PACKAGE_DIR,))  # reported at the caller's line, outside the package
    kept = tuple(i for i in ids if 0 <= i < vocab_size)
    if len(set(kept)) >= vocab_size:
        raise SettingsError(f"{name}: the ids cover the whole vocabulary of {vocab_size} tokens: nothing would be left "
                            "to generate; suppress fewer tokens")
    return kept


def check_positive_int(value: Any, name: str, what: str = "a positive integer") -> int:
    if not _is_int(value) or int(value) <= 0:
        raise SettingsError(f"{name}: expected {what}, found {_short(value)}")
    return int(value)


def check_max_new_tokens(value: Any, *, prompt_length: int = 0, context: int | None = None,
                         name: str = "max_new_tokens") -> int:
    """A positive integer; with `context`, the prompt plus that many tokens fit it."""
    n = check_positive_int(value, name)
    if context is not None and prompt_length + n > context:
        raise SettingsError(f"{name}: the prompt ({prompt_length} tokens) plus {n} new tokens exceed the model's "
                            f"context of {context} (text_config.max_position_embeddings); at most "
                            f"{max(context - prompt_length, 0)} new tokens fit")
    return n


def check_cache_dtype(value: Any, default: Any = None, name: str = "cache_dtype") -> np.dtype:
    """`value` (None: `default`, e.g. the model's dtype) as a float dtype; integer dtypes are refused (int8 codes
    are `KVCache.init(..., int8=True)`)."""
    try:
        return float_dtype(default if value is None else value, name,
                           "int8 codes with a scale per token are KVCache.init(..., int8=True)")
    except ValueError as e:
        raise SettingsError(str(e)) from None


def check_num_draft_tokens(value: Any, *, prompt_length: int = 0, context: int | None = None,
                           name: str = "num_draft_tokens") -> int:
    """A positive integer; with `context`, the verify chunk (the pending token and k drafts) fits it after the
    prompt."""
    k = check_positive_int(value, name, "a positive integer (drafts per target call)")
    if context is not None and prompt_length + k + 1 > context:
        raise SettingsError(f"{name}: {k} drafts do not fit the model's context of {context} after a prompt of "
                            f"{prompt_length} tokens (the verify chunk holds k + 1 tokens); expected at most "
                            f"{max(context - prompt_length - 1, 0)}")
    return k


def memory_bytes() -> int | None:
    """The memory a KV cache may take at most: the default device's free memory when JAX reports it (a GPU or a
    TPU: its limit less what is in use), else the machine's physical memory (`os.sysconf`); None when neither is
    known."""
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):  # what is free of it: the weights already loaded take their part
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:  # no backend yet, or one without memory statistics (the CPU)
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_max_context(config, value: Any, *, dtype: Any = "bfloat16", spare: int = 0, batch: int = 1,
                      raw_keys: bool = True, int8: bool = False, memory: int | None | str = "detect",
                      reserved: int = 0, name: str = "max_context") -> int:
    """Cache slots for a whole conversation (or the server's rows): a positive integer, at most the model's context
    (`text_config.max_position_embeddings`), whose KV cache (`model.cache.cache_bytes`, with `spare` ring slots and
    `batch` rows) fits `memory` bytes less `reserved` (e.g. the weights). `memory="detect"`: `memory_bytes()`;
    None: not checked. The refusal says how many slots fit."""
    n = check_positive_int(value, name, "a positive number of cache slots")
    context = config.text.max_position_embeddings
    if n > context:
        raise SettingsError(f"{name}: expected at most the model's context of {context:,} tokens "
                            f"(text_config.max_position_embeddings), found {n:,}")
    memory = memory_bytes() if memory == "detect" else memory
    if memory is None:
        return n
    budget = memory - reserved

    def size(slots: int) -> int:
        return cache_bytes(config, slots, dtype, batch=batch, raw_keys=raw_keys, int8=int8, spare=spare)

    need = size(n)
    if need > budget:
        # bytes grow linearly in the slots once the sliding ring is full: solve for the largest that fits
        ring = min(config.text.sliding_window + spare, n)
        base, step = size(ring), size(ring + 1) - size(ring)
        fits = ring + (budget - base) // step if budget >= base and step > 0 else 0
        fits = int(min(max(fits, 0), context))
        while fits > 0 and size(fits) > budget:
            fits -= 1
        where = f"{_gib(memory)} of memory" + (f" less {_gib(reserved)} for the weights" if reserved else "")
        raise SettingsError(f"{name}: a KV cache of {n:,} slots needs {_gib(need)}, more than the {where}; at most "
                            f"{fits:,} slots fit")
    return n


# ---- the sampling settings together ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Checked sampling settings (plain Python values; `params()` gives the traced `SamplingParams`).

    `SamplingSettings.checked(vocab_size, ...)` checks given values; `SamplingSettings.resolve(config,
    generation_config, ...)` first fills the unset ones from the generation config (`temperature=None`,
    `top_k=-1`, `top_p=-1.0`, `stop_ids=None`, `suppress_ids=None`, `pad_id=None`: its values)."""

    vocab_size: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop_ids: tuple[int, ...]
    suppress_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def checked(cls, vocab_size: int, *, temperature: Any, top_k: Any = None, top_p: Any = None,
                stop_ids: Any = (), suppress_ids: Any = (), pad_id: Any = 0) -> SamplingSettings:
        return cls(vocab_size=int(vocab_size), temperature=check_temperature(temperature), top_k=check_top_k(top_k),
                   top_p=check_top_p(top_p), stop_ids=check_token_ids(stop_ids, "stop_ids", vocab_size),
                   suppress_ids=check_suppress_ids(suppress_ids, vocab_size),
                   pad_id=check_pad_id(pad_id, vocab_size))

    @classmethod
    def resolve(cls, model_config, generation_config: Any = None, *, temperature: Any = None,
                top_k: Any = TOP_K_FROM_CONFIG, top_p: Any = TOP_P_FROM_CONFIG, stop_ids: Any = None,
                suppress_ids: Any = None, pad_id: Any = None, do_sample: Any = None) -> SamplingSettings:
        """Unset settings from `generation_config` (see `GenerationConfig.resolve`; None: the model config's),
        `do_sample=False`: greedy; then `checked`."""
        gen = generation_config if isinstance(generation_config, GenerationConfig) else GenerationConfig.resolve(
            generation_config, model_config)
        if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
            raise SettingsError(f"do_sample: expected True, False or None, found {_short(do_sample)}")
        temperature = gen.temperature if temperature is None else temperature
        if do_sample is False:
            temperature = 0.0
        if pad_id is None:
            pad_id = model_config.text.pad_token_id if gen.pad_id is None else gen.pad_id
        return cls.checked(
            model_config.text.vocab_size, temperature=temperature,
            top_k=gen.top_k if _is_int(top_k) and int(top_k) == TOP_K_FROM_CONFIG else top_k,
            top_p=gen.top_p if _is_real(top_p) and float(top_p) == TOP_P_FROM_CONFIG else top_p,
            stop_ids=gen.stop_ids if stop_ids is None else stop_ids,
            suppress_ids=gen.suppress_ids if suppress_ids is None else suppress_ids, pad_id=pad_id)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def require_key(self, key: Any, name: str = "key") -> None:
        """Sampling (temperature > 0) needs an explicit `jax.random` key; greedy decoding does not."""
        if not self.greedy and key is None:
            raise SettingsError(f"{name}: sampling (temperature {self.temperature:g} > 0) needs an explicit "
                                "jax.random key")

    def kwargs(self) -> dict[str, Any]:
        """The keywords of `SamplingParams.make` / `host_row` (after the vocabulary size)."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, suppress_ids=self.suppress_ids,
                    stop_ids=self.stop_ids, pad_id=self.pad_id)

    def params(self) -> SamplingParams:
        return SamplingParams.make(self.vocab_size, **self.kwargs())


def check_settings(model, *, temperature, top_k, top_p, stop_ids, suppress_ids, pad_id, max_new_tokens,
                   prompt_length: int) -> SamplingSettings:
    """`SamplingSettings.checked` and `check_max_new_tokens` against the model's vocabulary and context (the
    form the engine calls); returns the checked settings."""
    settings = SamplingSettings.checked(model.config.text.vocab_size, temperature=temperature, top_k=top_k,
                                        top_p=top_p, stop_ids=stop_ids, suppress_ids=suppress_ids, pad_id=pad_id)
    check_max_new_tokens(max_new_tokens, prompt_length=prompt_length,
                         context=model.config.text.max_position_embeddings)
    return settings
