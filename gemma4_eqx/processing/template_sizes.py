"""Sizes measured before the work, for the budgeted template sandbox (`sandbox.py`): what an operator, a str method,
a format or a filter would build is estimated from its inputs and refused (`TemplateBudgetError`) when it would pass
the render's `TemplateLimits` (characters of one string, items of one list, bits of one integer), so `'x' * 10**10`
or `2 ** (2 ** 36)` fail before any memory is spent; results are checked after (`check_result`).
"""

from __future__ import annotations

import re
import string
from typing import Any

from jinja2.runtime import Undefined
from jinja2.sandbox import MAX_RANGE

from .template_budget import budget_error, current_limits


# ----------------------------------------------------------------------------- sizes, measured before the work
def text_size(value: Any, limit: int) -> int:
    """About how many characters str(value) has (containers: their items' text, each reference counted), found
    without recursion and stopping as soon as the count passes `limit` (so it costs at most ~limit item visits)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, (bytes, bytearray)):
            total += len(item) + 3
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, Undefined):
            continue
        else:
            total += 64
        if total > limit:
            return total
    return total


def check_chars(n: int, what: str) -> None:
    limit = current_limits().max_chars
    if n > limit:
        raise budget_error(f"{what} would make {n:,} characters, more than the limit of {limit:,} for one string "
                           "(TemplateLimits.max_chars)")


def check_items(n: int, what: str) -> None:
    limit = current_limits().max_items
    if n > limit:
        raise budget_error(f"{what} would make {n:,} items, more than the limit of {limit:,} for one list or mapping "
                           "(TemplateLimits.max_items)")


def check_len(value: Any, n: int, what: str) -> None:
    (check_chars if isinstance(value, (str, bytes)) else check_items)(n, what)


def check_text(value: Any, what: str) -> int:
    limit = current_limits().max_chars
    n = text_size(value, limit)
    if n > limit:
        raise budget_error(f"{what} would make more than {limit:,} characters, the limit for one string "
                           "(TemplateLimits.max_chars)")
    return n


def check_int(value: Any, what: str) -> None:
    bits = current_limits().int_bits
    if value.bit_length() > bits:
        raise budget_error(f"{what} would make an integer of more than {bits:,} bits, the limit for one number "
                           "(TemplateLimits.int_bits)")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seq_len(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


# A printf-style conversion: flags, width and precision (digits or *), the conversion letter.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def check_percent_format(fmt: str, args: Any) -> None:
    """'%10s' % x and the `format` filter: widths and precisions (numbers or * taken from the arguments) within the
    size limit, and the conversions times the longest argument's text within it too."""
    limit = current_limits().max_chars
    conversions = 0
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.group(1, 2):
            if number and number != "*" and (len(number) > 12 or int(number) > limit):
                raise budget_error(f"the format width {number[:20]} is more than the limit of {limit:,} characters")
        conversions += match.group(3) != "%"
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    for value in values:
        if is_int(value) and abs(value) > limit and "*" in fmt:
            raise budget_error(f"the format width {value} is more than the limit of {limit:,} characters")
    longest = max((text_size(v, limit) for v in values), default=0)
    check_chars(len(fmt) + conversions * longest, "this % format")


def check_brace_format(fmt: str, args: Any, kwargs: Any) -> None:
    """'{:>10}'.format(x): every number in a format spec within the size limit, and the fields times the longest
    argument's text within it too."""
    limit = current_limits().max_chars
    fields = 0
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        fields += 1
        for number in re.findall(r"\d+", spec or ""):
            if len(number) > 12 or int(number) > limit:
                raise budget_error(f"the format spec {spec[:30]!r} asks for more than the limit of {limit:,} "
                                   "characters")
    values = list(args) + list(kwargs.values())
    for value in values:
        if is_int(value) and abs(value) > limit:
            raise budget_error(f"the format argument {value} is more than the limit of {limit:,}")
    longest = max((text_size(v, limit) for v in values), default=0)
    check_chars(len(fmt) + fields * longest, "this format")


def check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, an operation whose result would pass the size limits."""
    if op == "*":
        for seq, count in ((left, right), (right, left)):
            n = seq_len(seq)
            if n is not None and isinstance(count, int):
                check_len(seq, n * max(int(count), 0), f"{type(seq).__name__} * {short_int(count)}")
                return
        if is_int(left) and is_int(right):
            bits = current_limits().int_bits
            if left.bit_length() + right.bit_length() > bits + 1:
                raise budget_error(f"{left.bit_length()}-bit * {right.bit_length()}-bit would make an integer of "
                                   f"more than {bits:,} bits, the limit for one number (TemplateLimits.int_bits)")
    elif op == "**":
        if is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
            bits = current_limits().int_bits
            if right > bits or (abs(left).bit_length() - 1) * right > bits:
                raise budget_error(f"{short_int(left)} ** {short_int(right)} would make an integer of more than "
                                   f"{bits:,} bits, the limit for one number (TemplateLimits.int_bits)")
    elif op == "+":
        a, b = seq_len(left), seq_len(right)
        if a is not None and b is not None:
            check_len(left, a + b, f"{type(left).__name__} + {type(right).__name__}")
    elif op == "%":
        if isinstance(left, str):
            check_percent_format(left, right)


def short_int(value: Any) -> str:
    return str(value) if value.bit_length() < 64 else f"<a {value.bit_length()}-bit integer>"


def check_result(value: Any, what: str) -> Any:
    """A value returned by a call, filter or operator: its length (strings, lists, ...) or size (integers) within
    the limits (cheap: no walk into containers)."""
    if isinstance(value, (str, bytes)):
        check_chars(len(value), what)
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        check_items(len(value), what)
    elif is_int(value):
        check_int(value, what)
    return value


# ----------------------------------------------------------------------------- str methods and filters
def count_lines(text: Any) -> int:
    return text.count("\n") + 1


def check_str_method(subject: str, name: str, args: Any, kwargs: Any) -> None:
    """The str methods that can make a much longer string than their inputs: estimated first."""
    size = len(subject)
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if is_int(width):
            check_chars(max(size, width), f"str.{name}({width})")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if is_int(tab):
            check_chars(size + subject.count("\t") * max(tab, 0), f"str.expandtabs({tab})")
    elif name == "replace":
        old = args[0] if args else kwargs.get("old", "")
        new = args[1] if len(args) > 1 else kwargs.get("new", "")
        if isinstance(old, str) and isinstance(new, str):
            hits = subject.count(old) if old else size + 1
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if is_int(count) and count >= 0:
                hits = min(hits, count)
            check_chars(size + hits * len(new), "str.replace")
    elif name == "join":
        items = args[0] if args else ()
        if isinstance(items, (list, tuple)):
            total = sum(len(x) for x in items if isinstance(x, str)) + max(len(items) - 1, 0) * size
            check_chars(total, "str.join")
    elif name == "translate":
        table = args[0] if args else None
        if isinstance(table, dict):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            check_chars(size * max(longest, 1), "str.translate")
    elif name in ("encode",):
        check_chars(4 * size, "str.encode")
    elif name in ("split", "rsplit", "splitlines"):
        sep = args[0] if args and name != "splitlines" else kwargs.get("sep")
        pieces = subject.count(sep) + 1 if isinstance(sep, str) and sep else size // 2 + 1
        if name == "splitlines":
            pieces = count_lines(subject) + subject.count("\r")
        maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
        if is_int(maxsplit) and maxsplit >= 0 and name != "splitlines":
            pieces = min(pieces, maxsplit + 1)
        check_items(pieces, f"str.{name}")


# Filters that run a Python loop over their input's items: their input is held to the item limit.
LOOPING_FILTERS = {"batch", "slice", "unique", "groupby", "map", "select", "reject", "selectattr", "rejectattr",
                    "dictsort", "sort", "min", "max", "sum", "list", "join", "reverse", "random", "items", "count"}


def filter_check(name: str, value: Any, args: Any, kwargs: Any) -> tuple[Any, tuple]:
    """Checks before a filter runs; returns the value to give it (a generator materialised where it is measured)."""
    limit = current_limits().max_chars
    for arg in (*args, *kwargs.values()):
        if is_int(arg) and abs(arg) > limit:
            raise budget_error(f"the {name} filter's argument {short_int(arg)} is more than the limit of {limit:,}")
    if name in LOOPING_FILTERS and isinstance(value, (str, bytes, list, tuple, dict)):
        check_items(len(value), f"the {name} filter's input")
    if name in ("string", "pprint", "tojson", "e", "escape", "forceescape", "safe", "upper", "lower", "title",
                "capitalize", "trim", "striptags", "urlize", "urlencode", "xmlattr", "truncate", "center",
                "wordcount", "indent", "wordwrap", "replace", "format"):
        size = check_text(value, f"the {name} filter's input")
    else:
        size = 0
    text = value if isinstance(value, str) else None
    if name == "center":
        width = args[0] if args else kwargs.get("width", 80)
        check_chars(max(size, width if is_int(width) else 0), "the center filter")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        per_line = width if is_int(width) else len(str(width))
        lines = count_lines(text) if text is not None else size
        check_chars(size + lines * per_line, "the indent filter")
    elif name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        wrap_len = len(wrap) if isinstance(wrap, str) else 1
        words = text.count(" ") + count_lines(text) if text is not None else size
        breaks = size // max(width if is_int(width) else 1, 1) + words
        check_chars(size + breaks * wrap_len, "the wordwrap filter")
    elif name == "replace":
        old = args[0] if args else kwargs.get("old", "")
        new = args[1] if len(args) > 1 else kwargs.get("new", "")
        if isinstance(text, str) and isinstance(old, str):
            hits = text.count(old) if old else len(text) + 1
            check_chars(size + hits * len(str(new)), "the replace filter")
    elif name == "format":
        if isinstance(value, str):
            check_percent_format(value, kwargs if kwargs else tuple(args))
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        if (indent is not None and not isinstance(indent, (int, str))) or \
                (isinstance(indent, str) and len(indent) > 16) or (is_int(indent) and indent > 16):
            raise budget_error(f"the tojson filter's indent {indent!r} is more than 16, the limit")
    elif name == "join":
        if not isinstance(value, (list, tuple, str, dict, Undefined)):
            value = list(value)
        attribute = args[1] if len(args) > 1 else kwargs.get("attribute")
        sep = args[0] if args else kwargs.get("d", "")
        if attribute is None and isinstance(value, (list, tuple)):
            total = sum(text_size(v, limit) - 2 for v in value[: limit + 1]) + \
                max(len(value) - 1, 0) * len(str(sep))
            check_chars(total, "the join filter")
    elif name == "slice":
        slices = args[0] if args else kwargs.get("slices", 1)
        if is_int(slices) and slices > MAX_RANGE:
            raise budget_error(f"the slice filter's {slices} slices are more than {MAX_RANGE:,}, the limit")
    elif name == "sum":
        start = args[1] if len(args) > 1 else kwargs.get("start", 0)
        if not isinstance(start, (int, float)):  # sequences added one by one: quadratic in the items
            if not isinstance(value, (list, tuple)):
                value = list(value)
            total = sum(seq_len(v) or 0 for v in value)
            check_chars(total, "the sum filter")
            check_chars(len(value) * total // 16, "the sum filter's work (it copies the partial sums)")
    return value, args


__all__ = ["LOOPING_FILTERS", "check_binop", "check_brace_format", "check_chars", "check_int", "check_items",
           "check_len", "check_percent_format", "check_result", "check_str_method", "check_text", "count_lines",
           "filter_check", "is_int", "seq_len", "short_int", "text_size"]
