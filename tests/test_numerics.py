"""numerics="torch_cpu" against torch's CPU kernels, bit for bit (tests/fixtures/torch_numerics.npz, recorded by
scripts/record_torch_numerics.py with torch 2.13 on x86-64), and the switch between numerics modes."""

from __future__ import annotations

import functools
import json
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.layers.attention import Attention
from gemma4_eqx.layers.linear import Linear
from gemma4_eqx.layers.mlp import MLP
from gemma4_eqx.layers.norm import RMSNorm
from gemma4_eqx.layers.policy import Numerics, TorchCPU, as_numerics, holders
from gemma4_eqx.layers.numerics import (gelu_tanh_table, gelu_tanh_torch_cpu, reciprocal_sqrt, torch_cpu_mean,
                                        torch_cpu_sum)

# torch's bits and XLA's own rounding: the machine code XLA emits at its default level (conftest.py)
pytestmark = pytest.mark.machine_code


@pytest.fixture(scope="module")
def tiny_model():
    import hf_reference as ref

    return g4.load(ref.checkpoint_dir("tiny_a"))


@functools.lru_cache(maxsize=None)
def recorded() -> dict[str, np.ndarray]:
    from conftest import FIXTURES

    with np.load(FIXTURES / "torch_numerics.npz") as data:
        return {k: data[k] for k in data.files}


def widths(prefix: str) -> list[int]:
    return sorted({int(k.split("/")[-2]) for k in recorded() if k.startswith(prefix) and k.endswith("/x")})


def same_bits(ours, theirs) -> np.ndarray:
    """Elementwise: identical bit patterns (so -0 != +0), any NaN equal to any NaN."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    both_nan = np.isnan(ours.astype(np.float32)) & np.isnan(theirs.astype(np.float32))
    return (ours.view(f"u{ours.itemsize}") == theirs.view(f"u{theirs.itemsize}")) | both_nan


def test_fixture_came_from_torch_on_x86():
    info = json.loads(str(recorded()["_info"]))
    assert info["torch"].startswith("2.13") and info["cpu_capability"] in ("AVX2", "AVX512")


@pytest.mark.parametrize("n", widths("sum/"))
def test_cascade_sum_is_torchs_sum(n):
    """Rows shorter than a vector, with leftover scalars, with leftover vectors, and long enough for a carry."""
    x = recorded()[f"sum/{n}/x"]
    assert same_bits(jax.jit(torch_cpu_sum)(x), recorded()[f"sum/{n}/sum"]).all()
    assert same_bits(jax.jit(torch_cpu_mean)(x * x), recorded()[f"sum/{n}/mean_sq"]).all()


def test_cascade_sum_differs_from_xla_sum():
    """The reproduction is not vacuous: XLA's own reduction rounds differently on these rows."""
    x = recorded()["sum/3840/x"]
    assert not same_bits(jax.jit(lambda v: jnp.sum(v, axis=-1))(x), recorded()["sum/3840/sum"]).all()


def test_reciprocal_sqrt_is_torchs_pow_minus_half():
    assert same_bits(jax.jit(reciprocal_sqrt)(recorded()["rsqrt/x"]), recorded()["rsqrt/pow"]).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gelu_is_torchs_on_every_16_bit_input(dtype):
    everything = jnp.asarray(np.arange(1 << 16, dtype=np.uint16)).view(jnp.dtype(dtype))
    theirs = recorded()[f"gelu/{dtype}"].view(jnp.dtype(dtype))
    assert same_bits(gelu_tanh_table(dtype), theirs).all()
    assert same_bits(jax.jit(gelu_tanh_torch_cpu)(everything), theirs).all()


def test_gelu_float32_follows_torch_formula_closely():
    """float32 has no table: torch's operation order and SLEEF's saturation, XLA's tanh (last-bit differences)."""
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    bf16_inputs = x.astype(jnp.bfloat16)
    table = gelu_tanh_torch_cpu(bf16_inputs).astype(jnp.float32)
    ours = gelu_tanh_torch_cpu(bf16_inputs.astype(jnp.float32))
    assert np.abs(np.asarray(ours - table)).max() <= 0.02  # within a bf16 rounding of the exact table
    assert float(gelu_tanh_torch_cpu(jnp.float32(-9.0))) == 0.0  # saturated tanh: 1 + (-1) == 0, as torch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", widths("rmsnorm/float32/"))
def test_rmsnorm_is_transformers_rmsnorm(dtype, n):
    data = recorded()
    load = (lambda a: a) if dtype == "float32" else (lambda a: a.view(jnp.bfloat16))
    x, w, theirs = (load(data[f"rmsnorm/{dtype}/{n}/{k}"]) for k in ("x", "weight", "out"))
    norm = eqx.tree_at(lambda m: m.weight, RMSNorm(n, numerics=TorchCPU()), jnp.asarray(w))
    ours = eqx.filter_jit(norm)(jnp.asarray(x))
    assert ours.dtype == jnp.dtype(dtype)
    assert same_bits(np.asarray(ours), theirs).all(), f"{(~same_bits(np.asarray(ours), theirs)).sum()} differ"


def _switchable(tree) -> list:
    """Every module holding a numerics policy, nested ones included."""
    return [module for _, module in holders(tree, Numerics)]


@pytest.mark.parametrize("numerics", ["torch_cpu", "invariant"])
def test_with_numerics_switches_every_module_and_keeps_the_arrays(tiny_model, numerics):
    switched = tiny_model.with_numerics(numerics)
    modules = _switchable(switched)
    kinds = {type(m) for m in modules}
    assert kinds == {RMSNorm, MLP, Attention, Linear}
    assert len(modules) == len(_switchable(tiny_model)) and {m.numerics.name for m in modules} == {numerics}
    assert switched.numerics.name == numerics
    assert {m.numerics.name for m in _switchable(tiny_model)} == {"xla"}  # the original is untouched
    for a, b in zip(jax.tree.leaves(tiny_model), jax.tree.leaves(switched)):
        assert a is b
    assert {m.numerics.name for m in _switchable(switched.with_numerics("xla"))} == {"xla"}
    # the policy is part of the structure jit sees, not a leaf
    assert jax.tree.structure(switched) != jax.tree.structure(tiny_model)
    assert len(jax.tree.leaves(switched)) == len(jax.tree.leaves(tiny_model))


_logits = eqx.filter_jit(lambda m, ids: m(ids))


@pytest.mark.parametrize("numerics", ["torch_cpu", "invariant"])
def test_numerics_modes_compute_the_same_function(tiny_model, numerics):
    ids = jnp.asarray(np.arange(1, 40) % tiny_model.config.text.vocab_size, jnp.int32)
    # compiled whole (eagerly, every operation compiles alone); the numerics policy is part of the model's
    # structure, so each mode is a program of its own and the xla one is shared by both cases
    a, b = np.asarray(_logits(tiny_model, ids)), np.asarray(_logits(tiny_model.with_numerics(numerics), ids))
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_unknown_numerics_is_an_error(tiny_model):
    with pytest.raises(ValueError, match=r"numerics: expected one of \('xla', 'torch_cpu', 'invariant'\), found 'torch'"):
        tiny_model.with_numerics("torch")
    with pytest.raises(ValueError, match="numerics"):
        as_numerics("fast")


def test_bf16_torch_cpu_numerics_warns_without_the_rounding_flag(tiny_model, monkeypatch):
    # cast in numpy (eagerly, a cast compiles per leaf shape)
    bf16 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.bfloat16)) if eqx.is_inexact_array(x) else x,
                        tiny_model)
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="--xla_allow_excess_precision=false"):
        bf16.with_numerics("torch_cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_allow_excess_precision=false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16.with_numerics("torch_cpu")
        tiny_model.with_numerics("torch_cpu")  # float32: nothing to warn about


def test_load_passes_numerics(tmp_path, tiny_model):
    g4.save(tiny_model, tmp_path)
    loaded = g4.load(tmp_path, numerics="torch_cpu")
    assert {m.numerics.name for m in _switchable(loaded)} == {"torch_cpu"}
