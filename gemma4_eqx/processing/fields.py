"""Typed, ranged checks of the processor settings (processor_config.json and the sub-processors' fields).

Each image / video / audio processor declares `FIELDS`: field name -> check. The checks run when a processor is
built (from a config file, directly, or with call-time overrides), before any array is allocated, and a failure is a
`ProcessorConfigError` naming where the value came from (the file and section, or the class), the field, the value
found and what was expected:

    .../processor_config.json: image_processor.patch_size must be an integer in [1, 64], got 1000000
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any


class ProcessorConfigError(ValueError):
    """A processor setting of the wrong type or out of range (names the file or class, the field and the value)."""


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a hostile config may hold a huge value)."""
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) <= 64 else \
        f"<a {type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[:limit] + "..."


# A check returns None when the value is fine, else what was expected ("an integer in [1, 64]").
Check = Callable[[Any], Any]


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (bools, strings, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def integer(lo: int, hi: int, nullable: bool = False) -> Check:
    expected = f"an integer in [{lo}, {hi}]" + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        return None if is_int(value) and lo <= value <= hi else expected

    return check


def number(lo: float | int, hi: float | int, lo_open: bool = False, nullable: bool = False) -> Check:
    expected = (f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]" + (" or null" if nullable else ""))

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        ok = is_number(value) and (lo < value if lo_open else lo <= value) and value <= hi
        return None if ok else expected

    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def one_of(*choices: Any, note: str = "") -> Check:
    expected = f"one of {choices}{note}"

    def same(value: Any, choice: Any) -> bool:
        if is_int(choice):  # 280 and np.int64(280), not 280.0, "280" or True
            return is_int(value) and value == choice
        return type(value) is type(choice) and value == choice

    def check(value: Any) -> str | None:
        return None if any(same(value, c) for c in choices) else expected

    return check


def numbers_list(length: int, lo: float | int, hi: float | int, lo_open: bool = False) -> Check:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    expected = f"a list of {length} finite numbers in {interval}"

    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != length:
            return expected
        element = number(lo, hi, lo_open)
        return expected if any(element(v) for v in value) else None

    return check


def check_fields(values: Mapping[str, Any], checks: Mapping[str, Check], where: str) -> None:
    """Run `checks` on the fields of `values` that have one; `where` prefixes the field names in the message
    ("ImageProcessor." or ".../processor_config.json: image_processor.")."""
    for name, check in checks.items():
        if name in values:
            expected = check(values[name])
            if expected is not None:
                raise ProcessorConfigError(f"{where}{name} must be {expected}, got {short(values[name])}")


def section(config: Mapping[str, Any], key: str, source: str) -> dict | None:
    """`config[key]` when it is an object, None when absent or null or {}; ProcessorConfigError otherwise."""
    value = config.get(key)
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        from ..utils.files import json_type_name

        raise ProcessorConfigError(f"{source}: {key} must be a JSON object of its settings, got "
                                   f"{json_type_name(value)} ({short(value)})")
    return value
