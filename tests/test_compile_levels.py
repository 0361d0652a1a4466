"""The suite's two compile levels (tests/conftest.py): LLVM -O0 unless a test is marked `machine_code`."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LEVELS

pytestmark = pytest.mark.skipif(LEVELS["set_by_user"], reason="XLA_FLAGS names an optimisation level: left alone")
X = jnp.asarray(np.random.default_rng(0).normal(size=(64, 512)), jnp.float32)


def _multiply_add(x):
    # one fused multiply-add at LLVM's default level (a CPU with FMA: x86-64 since Haswell / Zen, every ARM64), two
    # roundings at -O0
    return x * x[::-1] + x[:, ::-1]


def _at(level: int) -> np.ndarray:
    return np.asarray(jax.jit(_multiply_add, compiler_options={"xla_backend_optimization_level": level})(X))


def test_the_program_tells_the_levels_apart():
    assert not np.array_equal(_at(0), _at(3))


def test_the_switch_is_installed():
    assert LEVELS["patched"], "jax._src.compiler.get_compile_options moved: every test now compiles at XLA's default"


def test_an_unmarked_test_compiles_at_o0():
    assert np.array_equal(np.asarray(jax.jit(_multiply_add)(X)), _at(0))


@pytest.mark.machine_code
def test_a_machine_code_test_compiles_at_xlas_default_level():
    assert not np.array_equal(np.asarray(jax.jit(_multiply_add)(X)), _at(0))


def test_a_child_process_compiles_at_o0():
    """CLI runs and notebooks' kernels inherit the level through XLA_FLAGS (the xdist workers take it back out)."""
    script = ("import jax, jax.numpy as jnp, numpy as np; x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 512)),"
              " jnp.float32); f = lambda x: x * x[::-1] + x[:, ::-1]; at = lambda o: np.asarray(jax.jit(f, "
              "compiler_options=o)(x)); print(np.array_equal(at(None), at({'xla_backend_optimization_level': 0})))")
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
