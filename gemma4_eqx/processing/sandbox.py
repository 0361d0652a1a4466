"""A budgeted jinja2 sandbox for chat templates: a checkpoint's template is untrusted text.

jinja2's `ImmutableSandboxedEnvironment` (what transformers uses) stops attribute escapes, but not work: nested
`range(100000)` loops, `2 ** (2 ** 36)` or `'x' * 10**10` run for minutes or exhaust memory. Here every render
gets a budget (`TemplateLimits`), and each way out of it ends in `TemplateBudgetError` naming the template and the
budget:

- steps: loop iterations (every `for`, recursive `loop(...)` calls included), calls (macros, methods, globals),
  filters and the intercepted operators each take one;
- size: no string, list or number built on the way may pass `max_chars` characters / items (`int_bits` bits for
  integers), checked *before* the work for `*`, `**`, `+`, `%`, `~`, str methods and filters that grow text
  (`center`, `indent`, `replace`, `join`, `format`, `wordwrap`, ...), and the text of every `{{ ... }}` output
  and `~` join is measured (a list of a million references to one long string counts its full text) before it is
  turned into a string;
- produced text: the rendered text, and all the text written on the way (macros, `{% set %}` blocks), each
  capped (`max_output_chars`, `max_produced_chars`);
- wall clock: `seconds`, checked at each step;
- recursion deeper than Python allows (macros calling themselves), and a template source longer than
  `max_source_chars`, are refused too.

The official Gemma 4 template renders exactly as in a plain sandbox (tests/test_chat_format.py); its renders use
a few hundred steps per message, far from the limits.
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import LoopContext, Undefined
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment


class TemplateBudgetError(ValueError):
    """A chat template that went past one of its render budgets (steps, size, produced text, time, recursion)."""


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may use. The defaults are far above what a real conversation needs with
    the official template (about 100 steps and a few times its text per message) and stop a hostile template
    within a few seconds."""

    max_steps: int = 2_000_000  # loop iterations + calls + filters + intercepted operators
    max_chars: int = 8 << 20  # characters of any one string built on the way
    max_items: int = 1 << 18  # items of any one list, tuple or dict built on the way (or fed to a looping filter)
    max_output_chars: int = 8 << 20  # characters of the rendered text
    max_produced_chars: int = 64 << 20  # characters written in all, macros and {% set %} blocks included
    int_bits: int = 1 << 16  # bits of any integer computed
    seconds: float | int = 4.0  # wall clock of one render
    max_source_chars: int = 1 << 20  # characters of the template source


DEFAULT_LIMITS = TemplateLimits()


class _Budget:
    """The running counts of one render."""

    __slots__ = ("deadline", "limits", "name", "produced", "steps")

    def __init__(self, limits: TemplateLimits, name: str):
        self.limits, self.name = limits, name
        self.steps = self.produced = 0
        self.deadline = time.monotonic() + limits.seconds

    def fail(self, what: str) -> TemplateBudgetError:
        return TemplateBudgetError(f"chat template {self.name}: {what}")

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise self.fail(f"stopped after {self.limits.max_steps:,} steps (loop iterations, calls, filters and "
                            "operators), the step budget of one render (TemplateLimits.max_steps)")
        if time.monotonic() > self.deadline:
            raise self.fail(f"stopped after {self.limits.seconds:g} s, the time budget of one render "
                            "(TemplateLimits.seconds)")

    def produce(self, chars: int) -> None:
        self.produced += chars
        if self.produced > self.limits.max_produced_chars:
            raise self.fail(f"wrote more than {self.limits.max_produced_chars:,} characters in all (macros and set "
                            "blocks included), the budget of text produced by one render "
                            "(TemplateLimits.max_produced_chars)")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("gemma4_eqx_template_budget", default=None)


def _limits() -> TemplateLimits:
    budget = _BUDGET.get()
    return DEFAULT_LIMITS if budget is None else budget.limits


def _fail(what: str) -> TemplateBudgetError:
    budget = _BUDGET.get()
    return budget.fail(what) if budget is not None else TemplateBudgetError(f"chat template: {what}")


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


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


def _check_chars(n: int, what: str) -> None:
    limit = _limits().max_chars
    if n > limit:
        raise _fail(f"{what} would make {n:,} characters, more than the limit of {limit:,} for one string "
                    "(TemplateLimits.max_chars)")


def _check_items(n: int, what: str) -> None:
    limit = _limits().max_items
    if n > limit:
        raise _fail(f"{what} would make {n:,} items, more than the limit of {limit:,} for one list or mapping "
                    "(TemplateLimits.max_items)")


def _check_len(value: Any, n: int, what: str) -> None:
    (_check_chars if isinstance(value, (str, bytes)) else _check_items)(n, what)


def _check_text(value: Any, what: str) -> int:
    limit = _limits().max_chars
    n = text_size(value, limit)
    if n > limit:
        raise _fail(f"{what} would make more than {limit:,} characters, the limit for one string "
                    "(TemplateLimits.max_chars)")
    return n


def _check_int(value: Any, what: str) -> None:
    bits = _limits().int_bits
    if value.bit_length() > bits:
        raise _fail(f"{what} would make an integer of more than {bits:,} bits, the limit for one number "
                    "(TemplateLimits.int_bits)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seq_len(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


# A printf-style conversion: flags, width and precision (digits or *), the conversion letter.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _check_percent_format(fmt: str, args: Any) -> None:
    """'%10s' % x and the `format` filter: widths and precisions (numbers or * taken from the arguments) within the
    size limit, and the conversions times the longest argument's text within it too."""
    limit = _limits().max_chars
    conversions = 0
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.group(1, 2):
            if number and number != "*" and (len(number) > 12 or int(number) > limit):
                raise _fail(f"the format width {number[:20]} is more than the limit of {limit:,} characters")
        conversions += match.group(3) != "%"
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    for value in values:
        if _is_int(value) and abs(value) > limit and "*" in fmt:
            raise _fail(f"the format width {value} is more than the limit of {limit:,} characters")
    longest = max((text_size(v, limit) for v in values), default=0)
    _check_chars(len(fmt) + conversions * longest, "this % format")


def _check_brace_format(fmt: str, args: Any, kwargs: Any) -> None:
    """'{:>10}'.format(x): every number in a format spec within the size limit, and the fields times the longest
    argument's text within it too."""
    limit = _limits().max_chars
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
                raise _fail(f"the format spec {spec[:30]!r} asks for more than the limit of {limit:,} characters")
    values = list(args) + list(kwargs.values())
    for value in values:
        if _is_int(value) and abs(value) > limit:
            raise _fail(f"the format argument {value} is more than the limit of {limit:,}")
    longest = max((text_size(v, limit) for v in values), default=0)
    _check_chars(len(fmt) + fields * longest, "this format")


def check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, an operation whose result would pass the size limits."""
    if op == "*":
        for seq, count in ((left, right), (right, left)):
            n = _seq_len(seq)
            if n is not None and isinstance(count, int):
                _check_len(seq, n * max(int(count), 0), f"{type(seq).__name__} * {_short_int(count)}")
                return
        if _is_int(left) and _is_int(right):
            bits = _limits().int_bits
            if left.bit_length() + right.bit_length() > bits + 1:
                raise _fail(f"{left.bit_length()}-bit * {right.bit_length()}-bit would make an integer of more than "
                            f"{bits:,} bits, the limit for one number (TemplateLimits.int_bits)")
    elif op == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            bits = _limits().int_bits
            if right > bits or (abs(left).bit_length() - 1) * right > bits:
                raise _fail(f"{_short_int(left)} ** {_short_int(right)} would make an integer of more than {bits:,} "
                            "bits, the limit for one number (TemplateLimits.int_bits)")
    elif op == "+":
        a, b = _seq_len(left), _seq_len(right)
        if a is not None and b is not None:
            _check_len(left, a + b, f"{type(left).__name__} + {type(right).__name__}")
    elif op == "%":
        if isinstance(left, str):
            _check_percent_format(left, right)


def _short_int(value: Any) -> str:
    return str(value) if value.bit_length() < 64 else f"<a {value.bit_length()}-bit integer>"


def check_result(value: Any, what: str) -> Any:
    """A value returned by a call, filter or operator: its length (strings, lists, ...) or size (integers) within
    the limits (cheap: no walk into containers)."""
    if isinstance(value, (str, bytes)):
        _check_chars(len(value), what)
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        _check_items(len(value), what)
    elif _is_int(value):
        _check_int(value, what)
    return value


# ----------------------------------------------------------------------------- str methods and filters
def _count_lines(text: Any) -> int:
    return text.count("\n") + 1


def _check_str_method(subject: str, name: str, args: Any, kwargs: Any) -> None:
    """The str methods that can make a much longer string than their inputs: estimated first."""
    size = len(subject)
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if _is_int(width):
            _check_chars(max(size, width), f"str.{name}({width})")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tab):
            _check_chars(size + subject.count("\t") * max(tab, 0), f"str.expandtabs({tab})")
    elif name == "replace":
        old = args[0] if args else kwargs.get("old", "")
        new = args[1] if len(args) > 1 else kwargs.get("new", "")
        if isinstance(old, str) and isinstance(new, str):
            hits = subject.count(old) if old else size + 1
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if _is_int(count) and count >= 0:
                hits = min(hits, count)
            _check_chars(size + hits * len(new), "str.replace")
    elif name == "join":
        items = args[0] if args else ()
        if isinstance(items, (list, tuple)):
            total = sum(len(x) for x in items if isinstance(x, str)) + max(len(items) - 1, 0) * size
            _check_chars(total, "str.join")
    elif name == "translate":
        table = args[0] if args else None
        if isinstance(table, dict):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            _check_chars(size * max(longest, 1), "str.translate")
    elif name in ("encode",):
        _check_chars(4 * size, "str.encode")
    elif name in ("split", "rsplit", "splitlines"):
        sep = args[0] if args and name != "splitlines" else kwargs.get("sep")
        pieces = subject.count(sep) + 1 if isinstance(sep, str) and sep else size // 2 + 1
        if name == "splitlines":
            pieces = _count_lines(subject) + subject.count("\r")
        maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
        if _is_int(maxsplit) and maxsplit >= 0 and name != "splitlines":
            pieces = min(pieces, maxsplit + 1)
        _check_items(pieces, f"str.{name}")


# Filters that run a Python loop over their input's items: their input is held to the item limit.
_LOOPING_FILTERS = {"batch", "slice", "unique", "groupby", "map", "select", "reject", "selectattr", "rejectattr",
                    "dictsort", "sort", "min", "max", "sum", "list", "join", "reverse", "random", "items", "count"}


def _filter_check(name: str, value: Any, args: Any, kwargs: Any) -> tuple[Any, tuple]:
    """Checks before a filter runs; returns the value to give it (a generator materialised where it is measured)."""
    limit = _limits().max_chars
    for arg in (*args, *kwargs.values()):
        if _is_int(arg) and abs(arg) > limit:
            raise _fail(f"the {name} filter's argument {_short_int(arg)} is more than the limit of {limit:,}")
    if name in _LOOPING_FILTERS and isinstance(value, (str, bytes, list, tuple, dict)):
        _check_items(len(value), f"the {name} filter's input")
    if name in ("string", "pprint", "tojson", "e", "escape", "forceescape", "safe", "upper", "lower", "title",
                "capitalize", "trim", "striptags", "urlize", "urlencode", "xmlattr", "truncate", "center",
                "wordcount", "indent", "wordwrap", "replace", "format"):
        size = _check_text(value, f"the {name} filter's input")
    else:
        size = 0
    text = value if isinstance(value, str) else None
    if name == "center":
        width = args[0] if args else kwargs.get("width", 80)
        _check_chars(max(size, width if _is_int(width) else 0), "the center filter")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        per_line = width if _is_int(width) else len(str(width))
        lines = _count_lines(text) if text is not None else size
        _check_chars(size + lines * per_line, "the indent filter")
    elif name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        wrap_len = len(wrap) if isinstance(wrap, str) else 1
        words = text.count(" ") + _count_lines(text) if text is not None else size
        breaks = size // max(width if _is_int(width) else 1, 1) + words
        _check_chars(size + breaks * wrap_len, "the wordwrap filter")
    elif name == "replace":
        old = args[0] if args else kwargs.get("old", "")
        new = args[1] if len(args) > 1 else kwargs.get("new", "")
        if isinstance(text, str) and isinstance(old, str):
            hits = text.count(old) if old else len(text) + 1
            _check_chars(size + hits * len(str(new)), "the replace filter")
    elif name == "format":
        if isinstance(value, str):
            _check_percent_format(value, kwargs if kwargs else tuple(args))
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        if (indent is not None and not isinstance(indent, (int, str))) or \
                (isinstance(indent, str) and len(indent) > 16) or (_is_int(indent) and indent > 16):
            raise _fail(f"the tojson filter's indent {indent!r} is more than 16, the limit")
    elif name == "join":
        if not isinstance(value, (list, tuple, str, dict, Undefined)):
            value = list(value)
        attribute = args[1] if len(args) > 1 else kwargs.get("attribute")
        sep = args[0] if args else kwargs.get("d", "")
        if attribute is None and isinstance(value, (list, tuple)):
            total = sum(text_size(v, limit) - 2 for v in value[: limit + 1]) + \
                max(len(value) - 1, 0) * len(str(sep))
            _check_chars(total, "the join filter")
    elif name == "slice":
        slices = args[0] if args else kwargs.get("slices", 1)
        if _is_int(slices) and slices > MAX_RANGE:
            raise _fail(f"the slice filter's {slices} slices are more than {MAX_RANGE:,}, the limit")
    elif name == "sum":
        start = args[1] if len(args) > 1 else kwargs.get("start", 0)
        if not isinstance(start, (int, float)):  # sequences added one by one: quadratic in the items
            if not isinstance(value, (list, tuple)):
                value = list(value)
            total = sum(_seq_len(v) or 0 for v in value)
            _check_chars(total, "the sum filter")
            _check_chars(len(value) * total // 16, "the sum filter's work (it copies the partial sums)")
    return value, args


def _budget_filter(name: str, func: Any) -> Any:
    """A filter that takes a step, is checked by `_filter_check` before it runs and by `check_result` after."""
    passes_arg = hasattr(func, "jinja_pass_arg")

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        _tick()
        lead, rest = (args[:1], args[1:]) if passes_arg else ((), args)
        if rest:
            value, extra = _filter_check(name, rest[0], rest[1:], kwargs)
            rest = (value, *extra)
        return check_result(func(*lead, *rest, **kwargs), f"the {name} filter")

    return run


def _budget_lipsum(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    if not (_is_int(n) and _is_int(max)) or n * max > 100_000:
        raise _fail(f"lipsum(n={n!r}, max={max!r}) asks for more than 100,000 words, the limit")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _budget_range(*args: Any) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise _fail(f"range of {len(rng):,} items, more than {MAX_RANGE:,}, the sandbox's limit")
    return rng


class _CountingIterator:
    """An iterator that takes a budget step per item."""

    __slots__ = ("_budget", "_it")

    def __init__(self, iterable: Any, budget: Any):
        self._it, self._budget = iter(iterable), budget

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self._budget.tick()
        return item


# ----------------------------------------------------------------------------- the environment
class _BudgetCodeGenerator(CodeGenerator):
    """jinja2's code generator, with every `for` loop's iterable counted and `~` joins measured."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        counted = nodes.Call(nodes.EnvironmentAttribute("budget_iter", lineno=node.iter.lineno), [node.iter], [],
                             None, None, lineno=node.iter.lineno)
        node = nodes.For(node.target, counted, node.body, node.else_, node.test, node.recursive, lineno=node.lineno)
        node.set_environment(self.environment)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        if self.optimizer is not None:
            folded = self.optimizer.visit(node, frame.eval_ctx)
            if folded != node:
                return self.visit(folded, frame)
        self.write("environment.budget_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BudgetedSandboxedEnvironment(ImmutableSandboxedEnvironment):
    """`ImmutableSandboxedEnvironment` whose renders run under a `TemplateLimits` budget (`render_within`)."""

    code_generator_class = _BudgetCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = _budget_range
        self.globals["lipsum"] = _budget_lipsum
        self.finalize = self._finalize_output
        for name, func in list(self.filters.items()):
            self.filters[name] = _budget_filter(name, func)

    def add_filter(self, name: str, func: Any) -> None:
        """Register a filter under the budget (as every default filter is)."""
        self.filters[name] = _budget_filter(name, func)

    # -- hooks called by the compiled template
    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        _tick()
        check_binop(operator_, left, right)
        return check_result(self.binop_table[operator_](left, right), f"the {operator_} operator")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        budget = _BUDGET.get()
        if isinstance(__obj, LoopContext) and args and budget is not None:  # a recursive loop's next level
            args = (_CountingIterator(args[0], budget), *args[1:])
        subject = getattr(__obj, "__self__", None)
        wrapped = getattr(__obj, "__wrapped__", None)  # str.format, as the sandbox wraps it
        if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str) and \
                getattr(wrapped, "__name__", "") in ("format", "format_map"):
            fmt_kwargs = args[0] if wrapped.__name__ == "format_map" and args and isinstance(args[0], dict) else kwargs
            _check_brace_format(wrapped.__self__, args if wrapped.__name__ == "format" else (), fmt_kwargs)
        elif isinstance(subject, str) and not isinstance(__obj, type):
            limit = _limits().max_chars
            for arg in (*args, *kwargs.values()):
                if _is_int(arg) and abs(arg) > limit:
                    raise _fail(f"str.{getattr(__obj, '__name__', '?')}'s argument {_short_int(arg)} is more than "
                                f"the limit of {limit:,}")
            _check_str_method(subject, getattr(__obj, "__name__", ""), args, kwargs)
        return check_result(super().call(__context, __obj, *args, **kwargs), "this call")

    def budget_iter(self, iterable: Any) -> Any:
        budget = _BUDGET.get()
        return iterable if budget is None else _CountingIterator(iterable, budget)

    def budget_join(self, parts: Any) -> str:
        """`a ~ b`: the parts' text measured (and counted as produced) before they are turned into strings."""
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
            budget.produce(_check_text(parts, "this ~ join"))
        return "".join(map(str, parts))

    def _finalize_output(self, value: Any) -> Any:
        """`{{ value }}`: its text measured before it is turned into a string (a list of references to one long
        string counts the text of each)."""
        if _BUDGET.get() is not None and not isinstance(value, str):
            _check_text(value, "this output")
        return value

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """The join of the rendered pieces (the whole output, a macro's or a set block's): capped as it grows."""
        budget = _BUDGET.get()
        if budget is None:
            return "".join(pieces)
        limit = budget.limits.max_output_chars
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            if size > limit:
                raise budget.fail(f"the rendered text passed {limit:,} characters, the output limit of one render "
                                  "(TemplateLimits.max_output_chars)")
            out.append(piece)
        budget.produce(size)
        return "".join(out)


def render_within(template: jinja2.Template, limits: TemplateLimits, name: str, **context: Any) -> str:
    """`template.render(**context)` under a fresh budget of `limits`; TemplateBudgetError naming `name` and the
    budget when it runs past one (a RecursionError included)."""
    budget = _Budget(limits, name)
    token = _BUDGET.set(budget)
    try:
        return template.render(**context)
    except RecursionError:
        raise budget.fail("recursion deeper than Python allows (a macro or loop calling itself without end)") from None
    except MemoryError:
        raise budget.fail("ran out of memory") from None
    finally:
        _BUDGET.reset(token)


def compile_budgeted(source: str, limits: TemplateLimits | None = None, name: str = "(a template string)",
                     **env_options: Any) -> jinja2.Template:
    """Compile `source` in a `BudgetedSandboxedEnvironment`; a source longer than `limits.max_source_chars`, or
    nested deeper than Python can compile, is a TemplateBudgetError naming `name`."""
    limits = limits or DEFAULT_LIMITS
    if len(source) > limits.max_source_chars:
        raise TemplateBudgetError(f"chat template {name}: {len(source):,} characters, more than the limit of "
                                  f"{limits.max_source_chars:,} for a template")
    env = BudgetedSandboxedEnvironment(**env_options)
    try:
        return env.from_string(source)
    except RecursionError:
        raise TemplateBudgetError(f"chat template {name}: nested deeper than Python can compile") from None


__all__ = ["BudgetedSandboxedEnvironment", "DEFAULT_LIMITS", "TemplateBudgetError", "TemplateLimits",
           "compile_budgeted", "render_within", "text_size"]
