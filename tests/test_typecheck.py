"""GEMMA4_EQX_TYPECHECK=1 turns on jaxtyping + beartype checks in user code (a fresh interpreter, no test hook)."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A wrong-length `positions`: the checks name the parameter before the body runs; without them the model's own
# shape check raises a ValueError later.
USER_CODE = """
import jax, jax.numpy as jnp
import jaxtyping
import gemma4_eqx as g4
print("enabled", g4.typecheck.enabled())
model = g4.load(g4.assets.TINY_CHECKPOINT)  # loading is cheaper than a random init in a fresh interpreter
try:
    model(jnp.arange(6), positions=jnp.arange(5))
except Exception as e:
    print("raised", type(e).__name__, isinstance(e, jaxtyping.TypeCheckError))
    print(e)
else:
    print("raised nothing")
"""


def _run(value: str | None, code: str = USER_CODE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_EQX_TYPECHECK"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    if value is not None:
        env["GEMMA4_EQX_TYPECHECK"] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_switch_on_a_wrong_shape_raises_a_jaxtyping_error_naming_the_argument():
    run = _run("1")
    assert run.returncode == 0, run.stderr
    assert "enabled True" in run.stdout
    assert "raised TypeCheckError True" in run.stdout
    assert "parameter 'positions'" in run.stdout
    assert "Gemma4.__call__" in run.stdout


@pytest.mark.parametrize("value", [None, "0"])
def test_switch_off_no_jaxtyping_check(value):
    run = _run(value)
    assert run.returncode == 0, run.stderr
    assert "enabled False" in run.stdout
    assert "raised ValueError False" in run.stdout  # the model's own check_shape, not jaxtyping
    assert "positions: expected shape" in run.stdout


def test_switch_on_checks_lazily_imported_submodules():
    code = """
import jax.numpy as jnp, jaxtyping
import gemma4_eqx as g4
try:
    g4.losses.next_token_nll(jnp.zeros((5, 8)), jnp.zeros((10, 8)), jnp.zeros((4,), jnp.int32), softcap=None)
except jaxtyping.TypeCheckError as e:
    print("checked", "parameter 'targets'" in str(e))
"""
    run = _run("1", code)
    assert run.returncode == 0, run.stderr
    assert "checked True" in run.stdout


def test_unknown_switch_value_is_named():
    run = _run("maybe", "import gemma4_eqx")
    assert run.returncode != 0
    assert "GEMMA4_EQX_TYPECHECK" in run.stderr and "'maybe'" in run.stderr
