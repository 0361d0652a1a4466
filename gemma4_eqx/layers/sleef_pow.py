"""float32 `base ** exponent` bit for bit as torch computes it on x86 CPUs, for RoPE's inverse frequencies.

transformers builds RoPE's table as `1.0 / (theta ** (arange(0, dim, 2) / dim))` in float32 on the CPU. torch
evaluates that power with SLEEF's vectorised single-precision `pow` (the 1-ulp variant, `Sleef_powf*_u10`, in its
AVX2 and AVX-512 builds, which use fused multiply-adds), which is not correctly rounded: for the 12B's sliding
layers (head_dim 256, theta 1e4) 19 of 128 powers differ by one ulp from NumPy's (the platform `powf`), and 9 of the
full layers' 64. One ulp of an inverse frequency is a phase error of up to position x 6e-8 radians, 6e-3 at 100K
tokens: a long-context difference from transformers that no other part of the model has.

This module evaluates SLEEF's algorithm in NumPy: log of the base in double-float (a float32 pair), times the
exponent, exp in double-float, every step rounded as the vector code rounds it (float32 adds and products, fused
multiply-adds rounded once). The published constants of SLEEF's minimax polynomials are used as they are; the
code is ours. `tests/test_sleef_pow.py` holds it against torch's own results (recorded with `.venv-hf`).

Only what RoPE needs is implemented: a finite normal base > 0 and finite exponents (`pow(x, 0) = 1`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

F32 = np.float32
F64 = np.float64

# SLEEF's split of ln 2 (upper part with trailing zero bits, lower part) and 1 / ln 2, as float32
_LN2_UPPER = F32(0.693145751953125)
_LN2_LOWER = F32(1.428606765330187045e-06)
_INV_LN2 = F32(1.442695040888963407359924681001892137426645954152985934135449406931)
# ln 2 as a float32 pair, and the minimax coefficients of log((1 + x) / (1 - x)) and exp on the reduced range
_LN2_PAIR = (F32(0.69314718246459960938), F32(-1.904654323148236017e-09))
_LOG_COEFFS = (F32(0.240320354700088500976562), F32(0.285112679004669189453125), F32(0.400007992982864379882812))
_LOG_C = (F32(0.66666662693023681640625), F32(3.69183861259614332084311e-09))
_EXP_COEFFS = (F32(0.00136324646882712841033936), F32(0.00836596917361021041870117),
               F32(0.0416710823774337768554688), F32(0.166665524244308471679688), F32(0.499999850988388061523438))


def fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32 (what a hardware fused multiply-add gives).

    a * b of two float32 is exact in float64; the float64 sum with its exact error (TwoSum) then decides the
    float32 rounding, including a sum that lands exactly halfway between two float32 values."""
    a, b, c = (np.asarray(v, F32) for v in (a, b, c))
    p = a.astype(F64) * b.astype(F64)
    s = p + c.astype(F64)
    bb = s - p
    err = (p - (s - bb)) + (c.astype(F64) - bb)  # p + c == s + err exactly
    r = s.astype(F32)
    other = np.nextafter(r, np.where(s > r.astype(F64), F32(np.inf), F32(-np.inf)).astype(F32))
    tie = (r.astype(F64) != s) & ((r.astype(F64) + other.astype(F64)) / 2 == s) & (err != 0)
    toward_up = err > 0
    pick_other = tie & ((other > r) == toward_up)
    return np.where(pick_other, other, r).astype(F32)


def _f(x) -> np.ndarray:
    return np.asarray(x, F32)


# ---- double-float arithmetic: a value is a pair (hi, lo) of float32 arrays, as in SLEEF's FMA builds -------------
def _add_ff(x, y):  # two floats, |x| >= |y| not required (the "2" variants) -> pair
    rx = _f(x + y)
    v = _f(rx - x)
    return rx, _f(_f(x - _f(rx - v)) + _f(y - v))


def _add2_pf(x, y):  # pair + float
    rx = _f(x[0] + y)
    v = _f(rx - x[0])
    ry = _f(_f(x[0] - _f(rx - v)) + _f(y - v))
    return rx, _f(ry + x[1])


def _add_pp(x, y):  # pair + pair, |x| >= |y|
    rx = _f(x[0] + y[0])
    return rx, _f(_f(_f(_f(x[0] - rx) + y[0]) + x[1]) + y[1])


def _add2_pp(x, y):  # pair + pair, any magnitudes
    rx = _f(x[0] + y[0])
    v = _f(rx - x[0])
    ry = _f(_f(x[0] - _f(rx - v)) + _f(y[0] - v))
    return rx, _f(ry + _f(x[1] + y[1]))


def _add_fp(x, y):  # float + pair, |x| >= |y|
    rx = _f(x + y[0])
    return rx, _f(_f(_f(x - rx) + y[0]) + y[1])


def _normalize(t):
    sx = _f(t[0] + t[1])
    return sx, _f(_f(t[0] - sx) + t[1])


def _scale(d, s):
    return _f(d[0] * s), _f(d[1] * s)


def _mul_pf(x, y):  # pair * float
    rx = _f(x[0] * y)
    return rx, fma(x[1], y, fma(x[0], y, -rx))


def _mul_pp(x, y):  # pair * pair
    rx = _f(x[0] * y[0])
    return rx, fma(x[0], y[1], fma(x[1], y[0], fma(x[0], y[0], -rx)))


def _square(x):
    rx = _f(x[0] * x[0])
    return rx, fma(_f(x[0] + x[0]), x[1], fma(x[0], x[0], -rx))


def _div_pp(n, d):
    t = _f(F32(1) / d[0])
    qx = _f(n[0] * t)
    u = fma(t, n[0], -qx)
    qy = fma(-d[1], t, fma(-d[0], t, F32(1)))
    return qx, fma(qx, qy, fma(n[1], t, u))


def _exponent(x: np.ndarray) -> np.ndarray:
    return ((x.view(np.int32) >> 23) & 0xFF) - 0x7F  # of a normal float32


def _log_pair(d: np.ndarray, avx512: bool):
    """log(d) as a float32 pair, for normal d > 0 (SLEEF's `logkf`).

    d = m * 2**e with m near 1. The AVX2 build takes e from d * (1 / 0.75) and m = d / 2**e; the AVX-512 build
    takes e the same way but m from `getmant` (d's significand folded into [0.75, 1.5)). They differ only for a
    significand within an ulp of 1.5, where the rounded product crosses a power of two."""
    e = _exponent(_f(d * F32(1.0 / 0.75)))
    if avx512:
        significand = _f(np.ldexp(d, -_exponent(d)))  # in [1, 2)
        m = np.where(significand >= F32(1.5), _f(significand * F32(0.5)), significand).astype(F32)
    else:
        m = _f(np.ldexp(d, -e))  # exact: only the exponent changes
    x = _div_pp(_add_ff(F32(-1), m), _add_ff(F32(1), m))
    x2 = _square(x)
    t = _f(_LOG_COEFFS[0])
    for coeff in _LOG_COEFFS[1:]:
        t = fma(t, x2[0], coeff)
    s = _mul_pf(_LN2_PAIR, e.astype(F32))
    s = _add_pp(s, _scale(x, F32(2)))
    return _add_pp(s, _mul_pp(_mul_pp(x2, x), _add2_pp(_mul_pf(x2, t), _LOG_C)))


def _exp_pair(d) -> np.ndarray:
    """exp of a float32 pair, rounded to float32 (SLEEF's `expkf`)."""
    u = _f(_f(d[0] + d[1]) * _INV_LN2)
    q = np.rint(u).astype(np.int32)  # round half to even, as the vector conversion
    qf = q.astype(F32)
    s = _add2_pf(d, _f(qf * -_LN2_UPPER))
    s = _add2_pf(s, _f(qf * -_LN2_LOWER))
    s = _normalize(s)
    u = _f(_EXP_COEFFS[0])
    for coeff in _EXP_COEFFS[1:]:
        u = fma(u, s[0], coeff)
    t = _add_pp(s, _mul_pf(_square(s), u))
    t = _add_fp(F32(1), t)
    out = _f(np.ldexp(_f(t[0] + t[1]), q))
    return np.where(d[0] < F32(-104), F32(0), out).astype(F32)


def sleef_powf(base: float, exponents: np.ndarray, *, avx512: bool = False) -> np.ndarray:
    """`float32(base) ** exponents` as SLEEF's vector `powf_u10` computes it (FMA builds), elementwise."""
    x = F32(base)
    y = np.asarray(exponents, F32)
    if not (np.isfinite(x) and x >= np.finfo(F32).tiny):
        raise ValueError(f"powf: base must be a finite normal float32 > 0, found {base!r}")
    if not np.all(np.isfinite(y)):
        raise ValueError("powf: exponents must be finite")
    lg = _log_pair(np.full(y.shape, x, F32), avx512)
    out = _exp_pair(_mul_pf(lg, y))
    out = np.where(np.isnan(out), F32(np.inf), out)
    return np.where((y == 0) | (x == F32(1)), F32(1), out).astype(F32)


def _cpu_has_avx512() -> bool:
    """What torch's dispatcher checks before it picks its AVX-512 kernels (F, CD, BW, DQ, VL: NumPy's AVX512_SKX)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return bool(__cpu_features__.get("AVX512_SKX", False))


@functools.lru_cache(maxsize=1)
def _libm_powf():
    """The C library's scalar `powf` (what `std::pow(float, float)` calls), or None where it cannot be loaded."""
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).powf
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return fn


def torch_cpu_pow(base: float, exponents: np.ndarray) -> np.ndarray:
    """`base ** exponents` (a Python float over a float32 vector) bit for bit as torch computes it on an x86 CPU.

    torch's vectorised loop covers the elements in whole blocks of two vectors (32 floats with its AVX-512 kernels,
    16 with AVX2) with SLEEF's `powf_u10`, and the remaining elements with the C library's `powf`; which kernels
    torch picks follows the CPU (AVX-512 F/CD/BW/DQ/VL), as here. The 12B's tables (128 and 64 exponents) are whole
    blocks either way. Without a loadable C `powf` the tail falls back to NumPy's power."""
    y = np.asarray(exponents, F32)
    avx512 = _cpu_has_avx512()
    block = 32 if avx512 else 16
    head = (y.size // block) * block
    out = np.empty_like(y)
    out[:head] = sleef_powf(base, y[:head], avx512=avx512)
    libm = _libm_powf()
    for i in range(head, y.size):
        out[i] = F32(libm(F32(base), y[i])) if libm is not None else np.power(F32(base), y[i])
    return out
