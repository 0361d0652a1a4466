"""RoPE's inverse frequencies bit for bit as torch computes them (`gemma4_eqx.layers.sleef_pow`).

The recorded powers (`scripts/record_torch_pow.py`, whole blocks of 32 exponents: SLEEF on every x86 CPU) and the
12B's two tables; tests/test_config_transformers.py compares whole tables, tails included, with live transformers.
"""

from fractions import Fraction

import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.config import FULL, SLIDING
from gemma4_eqx.layers.rope import inv_frequencies
from gemma4_eqx.layers.sleef_pow import fma, sleef_powf, torch_cpu_pow


@pytest.fixture(scope="module")
def recorded(fixtures_dir):
    return np.load(fixtures_dir / "torch_pow.npz")


def _round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to q (ties to even), computed exactly."""
    if q == 0:
        return np.float32(0)
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    scaled = q / Fraction(2) ** (e - 23)  # in [2^23, 2^24)
    m = scaled.numerator // scaled.denominator
    rest = scaled - m
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and m % 2):
        m += 1
    return np.float32(sign * float(Fraction(m) * Fraction(2) ** (e - 23)))


def test_fused_multiply_add_rounds_once():
    rng = np.random.default_rng(0)
    a, b, c = (np.float32(rng.standard_normal(4000) * 10.0 ** rng.integers(-6, 6, 4000)) for _ in range(3))
    # products cancelled by c up to the last bits, where double rounding would show
    c[:2000] = np.float32(-(a[:2000].astype(np.float64) * b[:2000]))
    ours = fma(a, b, c)
    exact = np.array([_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                      for x, y, z in zip(a, b, c)], np.float32)
    np.testing.assert_array_equal(ours, exact)


def test_a_sum_on_a_float32_midpoint_rounds_by_the_part_float64_dropped():
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies halfway between two float32 values; adding +-2^-70 (lost in float64)
    # must decide the rounding: up, and down (ties-to-even alone would round both down)
    a, low = np.float32(1 + 2.0 ** -12), np.float32(1 + 2.0 ** -11)
    assert fma(a, a, np.float32(2.0 ** -70)) == np.nextafter(low, np.float32(2))
    assert fma(a, a, np.float32(-(2.0 ** -70))) == low


def test_sleef_powf_equals_torch_on_recorded_blocks(recorded):
    for theta, exps, powers in zip(recorded["thetas"], recorded["exponents"], recorded["powers"]):
        for avx512 in (False, True):
            np.testing.assert_array_equal(sleef_powf(float(theta), exps, avx512=avx512), powers, err_msg=str(theta))
        np.testing.assert_array_equal(torch_cpu_pow(float(theta), exps), powers, err_msg=str(theta))


def test_the_12b_rope_tables_equal_transformers(recorded):
    t = g4.Gemma4Config.gemma4_12b().text
    sliding, full = t.layer_geometry_for_type(SLIDING), t.layer_geometry_for_type(FULL)
    np.testing.assert_array_equal(inv_frequencies(sliding.rope, sliding.head_dim), recorded["sliding_12b"])
    theirs = np.concatenate([recorded["full_12b"], np.zeros(256 - 64, np.float32)])
    np.testing.assert_array_equal(inv_frequencies(full.rope, full.head_dim), theirs)


def test_bad_bases_are_refused_by_name():
    with pytest.raises(ValueError, match="base must be a finite normal float32 > 0"):
        sleef_powf(-2.0, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="exponents must be finite"):
        sleef_powf(2.0, np.array([np.nan], np.float32))
