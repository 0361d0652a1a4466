"""The budget of one chat-template render (`TemplateLimits`) and its running counts, for the budgeted sandbox
(`sandbox.py`): the budget of the render in progress is a context variable, so the sandbox's hooks and the size
checks (`template_sizes.py`) find it without being handed it, and a render outside `render_within` runs unbudgeted.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass


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


class Budget:
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


CURRENT_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("gemma4_eqx_template_budget",
                                                                              default=None)


def current_limits() -> TemplateLimits:
    """The limits of the render in progress (the defaults outside one)."""
    budget = CURRENT_BUDGET.get()
    return DEFAULT_LIMITS if budget is None else budget.limits


def budget_error(what: str) -> TemplateBudgetError:
    """The error for `what`, naming the template of the render in progress."""
    budget = CURRENT_BUDGET.get()
    return budget.fail(what) if budget is not None else TemplateBudgetError(f"chat template: {what}")


def tick() -> None:
    """One step of the render in progress (none outside one)."""
    budget = CURRENT_BUDGET.get()
    if budget is not None:
        budget.tick()


__all__ = ["CURRENT_BUDGET", "DEFAULT_LIMITS", "Budget", "TemplateBudgetError", "TemplateLimits", "budget_error",
           "current_limits", "tick"]
