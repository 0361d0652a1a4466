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

import functools
from collections.abc import Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import LoopContext
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from .template_budget import (CURRENT_BUDGET, DEFAULT_LIMITS, Budget, TemplateBudgetError, TemplateLimits, budget_error,
                              current_limits, tick)
from .template_sizes import (check_binop, check_brace_format, check_result, check_str_method, check_text, filter_check,
                             is_int, short_int, text_size)


def _budget_filter(name: str, func: Any) -> Any:
    """A filter that takes a step, is checked by `filter_check` before it runs and by `check_result` after."""
    passes_arg = hasattr(func, "jinja_pass_arg")

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        tick()
        lead, rest = (args[:1], args[1:]) if passes_arg else ((), args)
        if rest:
            value, extra = filter_check(name, rest[0], rest[1:], kwargs)
            rest = (value, *extra)
        return check_result(func(*lead, *rest, **kwargs), f"the {name} filter")

    return run


def _budget_lipsum(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    if not (is_int(n) and is_int(max)) or n * max > 100_000:
        raise budget_error(f"lipsum(n={n!r}, max={max!r}) asks for more than 100,000 words, the limit")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _budget_range(*args: Any) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise budget_error(f"range of {len(rng):,} items, more than {MAX_RANGE:,}, the sandbox's limit")
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
        tick()
        check_binop(operator_, left, right)
        return check_result(self.binop_table[operator_](left, right), f"the {operator_} operator")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        tick()
        budget = CURRENT_BUDGET.get()
        if isinstance(__obj, LoopContext) and args and budget is not None:  # a recursive loop's next level
            args = (_CountingIterator(args[0], budget), *args[1:])
        subject = getattr(__obj, "__self__", None)
        wrapped = getattr(__obj, "__wrapped__", None)  # str.format, as the sandbox wraps it
        if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str) and \
                getattr(wrapped, "__name__", "") in ("format", "format_map"):
            fmt_kwargs = args[0] if wrapped.__name__ == "format_map" and args and isinstance(args[0], dict) else kwargs
            check_brace_format(wrapped.__self__, args if wrapped.__name__ == "format" else (), fmt_kwargs)
        elif isinstance(subject, str) and not isinstance(__obj, type):
            limit = current_limits().max_chars
            for arg in (*args, *kwargs.values()):
                if is_int(arg) and abs(arg) > limit:
                    name = getattr(__obj, "__name__", "?")
                    raise budget_error(f"str.{name}'s argument {short_int(arg)} is more than "
                                       f"the limit of {limit:,}")
            check_str_method(subject, getattr(__obj, "__name__", ""), args, kwargs)
        return check_result(super().call(__context, __obj, *args, **kwargs), "this call")

    def budget_iter(self, iterable: Any) -> Any:
        budget = CURRENT_BUDGET.get()
        return iterable if budget is None else _CountingIterator(iterable, budget)

    def budget_join(self, parts: Any) -> str:
        """`a ~ b`: the parts' text measured (and counted as produced) before they are turned into strings."""
        budget = CURRENT_BUDGET.get()
        if budget is not None:
            budget.tick()
            budget.produce(check_text(parts, "this ~ join"))
        return "".join(map(str, parts))

    def _finalize_output(self, value: Any) -> Any:
        """`{{ value }}`: its text measured before it is turned into a string (a list of references to one long
        string counts the text of each)."""
        if CURRENT_BUDGET.get() is not None and not isinstance(value, str):
            check_text(value, "this output")
        return value

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """The join of the rendered pieces (the whole output, a macro's or a set block's): capped as it grows."""
        budget = CURRENT_BUDGET.get()
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
    budget = Budget(limits, name)
    token = CURRENT_BUDGET.set(budget)
    try:
        return template.render(**context)
    except RecursionError:
        raise budget.fail("recursion deeper than Python allows (a macro or loop calling itself without end)") from None
    except MemoryError:
        raise budget.fail("ran out of memory") from None
    finally:
        CURRENT_BUDGET.reset(token)


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
