"""Typed, ranged reading of config.json fields: each reader names the field, the value found and what was
expected (`ConfigError`), and a field the real config.json always carries is never given a default."""

from __future__ import annotations

import json
import math
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a model this package can build."""


def read_json_file(path: str, error: type[Exception]) -> object:
    """The JSON value in the file at `path`; `error` (naming the file) when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from e
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from None


def fail(field: str, message: str) -> None:
    raise ConfigError(f"{field}: {message}")


REQUIRED = object()  # a field the real config.json always carries: no default is assumed for it
MAX_DIM = 2**31 - 1  # sizes and ids beyond int32 describe no buildable model
MAX_LAYERS = 4096


def _path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(d: dict[str, Any], key: str, prefix: str, default: Any, what: str) -> Any:
    if key in d:
        return d[key]
    if default is REQUIRED:
        fail(_path(prefix, key), f"missing; expected {what} (the real config.json always carries it)")
    return default


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_int(d: dict[str, Any], key: str, prefix: str, default: Any = REQUIRED, *, minimum: int = 1,
         maximum: int = MAX_DIM, nullable: bool = False) -> Any:
    """An integer in [minimum, maximum] (floats such as 16.9 or 16.0, bools and strings are refused)."""
    what = ({1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
            + (f" <= {maximum}" if maximum != MAX_DIM else "") + (" or null" if nullable else ""))
    value = _field(d, key, prefix, default, what)
    if value is None and (nullable or default is None):
        return None
    if not is_int(value) or not minimum <= value <= maximum:
        fail(_path(prefix, key), f"expected {what}, found {short(value)}")
    return value


def as_number(value: Any) -> float | None:
    """A JSON number as a finite float, else None (bools, strings, NaN, infinities, huge ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def read_float(d: dict[str, Any], key: str, prefix: str, default: Any = REQUIRED, *, positive: bool = True,
           maximum: float | None = None, nullable: bool = False) -> Any:
    """A finite number, > 0 when `positive` (else >= 0), <= maximum when given; null only when `nullable`."""
    what = ("a finite number " + ("> 0" if positive else ">= 0") + (f" and <= {maximum}" if maximum else "")
            + (" or null" if nullable else ""))
    value = _field(d, key, prefix, default, what)
    if value is None and nullable:
        return None
    x = as_number(value)
    if x is None or (x <= 0 if positive else x < 0) or (maximum is not None and x > maximum):
        fail(_path(prefix, key), f"expected {what}, found {short(value)}")
    return x


def read_bool(d: dict[str, Any], key: str, prefix: str, default: Any = REQUIRED) -> bool:
    """true or false (the strings "false"/"true", 0 and 1 are refused: "false" would read as True)."""
    value = _field(d, key, prefix, default, "true or false")
    if not isinstance(value, bool):
        fail(_path(prefix, key), f"expected true or false, found {short(value)}")
    return value


def read_choice(d: dict[str, Any], key: str, prefix: str, choices: tuple[Any, ...], default: Any = REQUIRED) -> Any:
    value = _field(d, key, prefix, default, f"one of {choices}")
    if not isinstance(value, (str, type(None))) or value not in choices:
        fail(_path(prefix, key), f"expected one of {choices}, found {short(value)}")
    return value


def read_section(d: dict[str, Any], key: str, prefix: str = "", default: Any = REQUIRED) -> Any:
    value = _field(d, key, prefix, default, "an object")
    if value is not default and not isinstance(value, dict):
        fail(_path(prefix, key), f"expected an object, found {short(value)}")
    return value


def token_ids(value: Any, field: str, vocab_size: int | None = None) -> tuple[int, ...]:
    """An id or a non-empty list of ids, each in [0, vocab_size)."""
    ids = [value] if not isinstance(value, (list, tuple)) else list(value)
    top = MAX_DIM if vocab_size is None else vocab_size - 1
    if not ids or not all(is_int(i) and 0 <= i <= top for i in ids):
        fail(field, f"expected a token id or a non-empty list of token ids in [0, {top}], found {short(value)}")
    return tuple(ids)


def field_default(cls: type, name: str) -> Any:
    """A dataclass field's own default: `from_hf_dict` assumes nothing else for an absent optional field."""
    return cls.__dataclass_fields__[name].default
