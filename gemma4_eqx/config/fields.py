"""Typed, ranged reading of config.json fields: each reader names the field, the value found and what was
expected (`ConfigError`), and a field the real config.json always carries is never given a default."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..utils import files

T = TypeVar("T")


class ConfigError(ValueError):
    """A config.json that does not describe a model this package can build."""


# Size limit of the small JSON files of a checkpoint folder (config.json, generation_config.json: a few kB each).
MAX_CONFIG_BYTES = 8 << 20


def parse_json_bytes(raw: bytes, path: str, error: type[Exception]) -> object:
    """The JSON value in `raw` (read from `path`; UTF-8, or UTF-16/32 as json itself detects); `error` naming the
    file when it is not valid JSON or nested deeper than `utils.files.MAX_JSON_DEPTH`."""
    try:
        text = raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError) as e:
        raise error(f"{path}: not valid JSON (not UTF-8 text: {str(e)[:200]})") from None
    try:
        return files.parse_json(text, path)
    except files.FileReadError as e:
        raise error(str(e)) from None


def read_json_file(path: str | os.PathLike, error: type[Exception], max_bytes: int | None = MAX_CONFIG_BYTES,
                   folder: files.Folder | None = None) -> object:
    """The JSON value in the file at `path` (with `folder`: the file of that name in the opened folder), read
    through `utils.files` (a regular file, at most `max_bytes`); `error` naming the file when it cannot be read or
    parsed, `FileMissingError` (a FileNotFoundError) when it does not exist."""
    try:
        if folder is not None:
            shown = folder.join(os.fspath(path))
            raw = folder.read_bytes(os.fspath(path), max_bytes, "a JSON file")
        else:
            shown = os.fspath(path)
            raw = files.read_bytes(path, max_bytes, "a JSON file")
    except files.FileMissingError:
        raise
    except files.FileReadError as e:
        raise error(str(e)) from None
    return parse_json_bytes(raw, shown, error)


def read_config_file(path: str | os.PathLike, error: type[Exception], name: str = "config.json",
                     max_bytes: int | None = MAX_CONFIG_BYTES) -> tuple[object, str]:
    """(the JSON value, the file's path) of `name` in the folder `path`, or of the file `path` itself. In a folder
    the file is opened as `utils.files.Folder` opens one (its symlink rule); a file named directly is the caller's
    choice and is followed. Missing: `FileMissingError` ("no NAME at PATH")."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            with files.Folder(path) as folder:
                return read_json_file(name, error, max_bytes, folder), os.path.join(path, name)
        return read_json_file(path, error, max_bytes), path
    except files.FileMissingError:
        raise files.FileMissingError(f"no {name} at {os.path.join(path, name) if os.path.isdir(path) else path}"
                                     ) from None


def parse_config_file(path: str | os.PathLike, parse: Callable[[Any], T]) -> T:
    """`parse` (a `from_hf_dict`) applied to the folder's config.json (or the file `path`); a `ConfigError` it
    raises is re-raised with the file's path in front."""
    d, file = read_config_file(path, ConfigError)
    try:
        return parse(d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


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
