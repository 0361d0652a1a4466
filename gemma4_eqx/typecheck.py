"""Runtime shape and dtype checks for user code: jaxtyping + beartype on every annotated function of the package.

Every public function and module of gemma4_eqx carries jaxtyping annotations (`Float[Array, "seq hidden"]`).
The tests check them all (`tests/conftest.py`); to have them checked in your own program, set the environment
variable before the first `import gemma4_eqx`:

    GEMMA4_EQX_TYPECHECK=1 python train.py

or, in Python, before importing the package:

    import os; os.environ["GEMMA4_EQX_TYPECHECK"] = "1"
    import gemma4_eqx as g4
    g4.typecheck.enabled()   # -> True

A call with a wrong shape or dtype then raises `jaxtyping.TypeCheckError` naming the function and the parameter
(`... typechecking parameter 'positions'` with the sizes every named axis was bound to), before the function
body runs, instead of a broadcasting error deep inside or, worse, a silent broadcast.

The switch acts at import time: the package's modules are compiled with a decorator on every annotated function
and class (jaxtyping's import hook), so it cannot be turned on after `gemma4_eqx` has been imported; `enabled()`
says whether it was. Cost: the checks run in Python at every call of an annotated function, so they cost where
Python runs: tracing costs more (eager code at every call, `jax.jit` once per shape), a compiled call the same
(measured by `benchmarks/typecheck_cost.py`, figures in benchmarks/RESULTS.md). Values accepted: "1", "true", "yes", "on" (any case); unset,
"", "0", "false", "no", "off" leave it off; anything else is an error.
"""

from __future__ import annotations

import os

ENV_VAR = "GEMMA4_EQX_TYPECHECK"
PACKAGE = "gemma4_eqx"
TYPECHECKER = "beartype.beartype"

_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_hook = None


def requested(environ=None) -> bool:
    """Whether the environment asks for the checks (`GEMMA4_EQX_TYPECHECK`); an unknown value is an error."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV_VAR}: expected one of {_ON} (checks on) or {_OFF} (off), found {value!r}")


def install() -> None:
    """Install the import hook for the package's submodules (called by `gemma4_eqx/__init__.py` first thing when
    `requested()`); it stays for the process so lazily imported submodules (train, nnx, ...) are checked too."""
    global _hook
    if _hook is None:
        from jaxtyping import install_import_hook

        _hook = install_import_hook(PACKAGE, TYPECHECKER)


def enabled() -> bool:
    """Whether the package's functions were compiled with the checks (the switch was on at import)."""
    return _hook is not None
