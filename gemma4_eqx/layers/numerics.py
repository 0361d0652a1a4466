"""The arithmetic behind the numerics policies (`layers/policy.py`: `XLA`, `TorchCPU`, `Invariant`).

The model's maths is one formula, but a float32 sum depends on the order it adds in and a tanh on its last bit.
`"xla"` lets XLA choose (fast, on any backend). `"torch_cpu"` reproduces, in plain XLA ops, the places where
transformers' CPU run rounds differently from XLA (measured against torch 2.13 on x86-64):

- the RMSNorm mean of squares: torch squares, then sums a row in its cascade order (`torch_cpu_sum` below) and
  divides by n; XLA would fuse the squares into the adds (fused multiply-adds) and divide by multiplying with 1/n,
  so the squares and the divisor sit behind optimization barriers;
- `pow(mean + eps, -0.5)`: torch computes `1 / sqrt(.)` as two rounded operations, where XLA fuses an rsqrt;
- GELU-tanh: torch's tanh is SLEEF's, which saturates to +-1 above |y| > ln(2^25) / 2 and is otherwise correctly
  rounded on every bf16 input; for 16-bit inputs the activation is a function of 65,536 values, so it is
  tabulated once (numpy, float64 tanh) and looked up;
- RoPE's `x * cos + rotate_half(x) * sin`: torch rounds both products, then adds; LLVM may contract a product
  and the add into a fused multiply-add (`layers.rope.apply_rope_rounded` keeps the products behind barriers).

With `"torch_cpu"` and `XLA_FLAGS=--xla_allow_excess_precision=false` (so XLA rounds after every bf16 operation, as
torch does) the bf16 logits of the test checkpoints equal transformers' bit for bit (tests/test_hf_parity.py). It
is a verification mode: the cascade sum is a chain of small adds, slower than XLA's reduction on an accelerator.

`"invariant"` makes every token's numbers independent of the shape of the call that computes them: how many
tokens go through together, how many cache slots are empty, where the ring buffer starts. XLA picks loop
vectorisation and fusion per shape, so by default a row reduction or a fused exp rounds differently for a
40-token forward than for a 9-token one (a few fp32 ulps at the logits), and cached decoding can only equal the
no-cache forward to rounding. Under `"invariant"`:

- RMSNorm sums each row in the fixed cascade order of `torch_cpu_sum` (explicit adds, independent of the rows);
- attention (`layers.kernels.ordered_attention`) sums its scores one head_dim component at a time and its
  softmax and values one key at a time in key order, so masked keys and empty slots add exact zeros; its
  inputs, exponentials and outputs sit behind optimization barriers so that XLA fuses them the same way for
  every shape; the sliding layers read their ring buffer oldest first;
- RoPE rounds its two products before adding them (`apply_rope_rounded`): whether LLVM contracts them into a
  fused multiply-add depends on how the rotation is fused with its consumers, and in a cached call the keys also
  feed the ring's write (seen on an AMD EPYC host, one ulp apart, where an Intel host fused both alike);
- every matmul (the projections and the tied lm head) multiplies one row at a time through the same
  vector-matrix kernel; the lm head's transposed table is materialised behind a barrier (folded into the dot,
  it let XLA pick another bf16 kernel when jit saw the weights as constants rather than arguments).

Then `decode_step` logits equal the no-cache forward over the same tokens bit for bit, in fp32 and in bf16, and
so do a chunked and a whole prefill (tests/test_invariant.py), measured on XLA:CPU. The price is speed: the
key and row loops are sequential (fine for checks on small models and short contexts; far too slow for long 12B
contexts) and the score matrix is always built.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Float

# torch's float sum kernel on x86-64 accumulates in vectors of 8 lanes (AVX2 width; also on AVX-512 machines,
# measured), with 4 vectors in flight and a cascade of 4 levels; see `torch_cpu_sum`.
TORCH_SUM_LANES = 8
TORCH_SUM_ILP = 4
TORCH_SUM_LEVELS = 4
# SLEEF's float tanh returns +-1 beyond this argument (0.5 * ln(2^25)).
SLEEF_TANHF_SATURATES_ABOVE = 8.664339742
EXCESS_PRECISION_FLAG = "--xla_allow_excess_precision=false"


def compute_dtype(dtype):
    """fp32 for bf16/f16/fp32 activations (as transformers upcasts), fp64 stays fp64 (for gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def rowwise_matmul(x: Float[Array, "*batch k"], w: Float[Array, "k n"]) -> Float[Array, "*batch n"]:
    """`x @ w` one row of `x` at a time, each through the same vector-matrix kernel (`numerics="invariant"`).

    XLA picks a matmul's summation order by its shape (on CPU a 64-row product of a 64x32 weight rounds row 0
    differently from a 1-row one), which would make a token's result depend on how many tokens share the call.
    """
    barrier = jax.lax.optimization_barrier
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.map(lambda row: barrier(barrier(row) @ w), rows)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def excess_precision_disabled() -> bool:
    """Whether XLA was told to round after every low-precision operation (read when the backend starts)."""
    return EXCESS_PRECISION_FLAG in os.environ.get("XLA_FLAGS", "").split()


def warn_if_bf16_rounding_differs(dtype) -> None:
    if jnp.dtype(dtype).itemsize == 2 and not excess_precision_disabled():
        warnings.warn(f"numerics='torch_cpu' in {jnp.dtype(dtype).name}: XLA keeps excess precision between "
                      f"operations unless XLA_FLAGS contains {EXCESS_PRECISION_FLAG} (set before JAX starts), so "
                      "intermediate roundings will differ from torch's", stacklevel=4)


# ---- the cascade sum ------------------------------------------------------------------------------------------

def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _add(a, b):
    """a + b where None stands for an accumulator that is still exactly zero."""
    return b if a is None else a + b


def _multi_row_sum(rows: list[Float[Array, "*batch ilp lanes"]]) -> Float[Array, "*batch ilp lanes"]:
    """torch's `multi_row_sum`: add `rows` (each [..., nrows, lanes]) into 4 cascade levels.

    Rows are added one by one into level 0; every `step` rows level 0 is carried into level 1, and a level is
    carried further up each time its own count of `step` carries completes. Finally levels 1..3 join level 0.
    """
    size = len(rows)
    power = max(4, _ceil_log2(size) // TORCH_SUM_LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    acc = [None] * TORCH_SUM_LEVELS
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = _add(acc[0], rows[i])
            i += 1
        for j in range(1, TORCH_SUM_LEVELS):
            acc[j], acc[j - 1] = _add(acc[j], acc[j - 1]), None
            if i & (mask << (j * power)):
                break
    for row in rows[i:]:
        acc[0] = _add(acc[0], row)
    for j in range(1, TORCH_SUM_LEVELS):
        if acc[j] is not None:
            acc[0] = _add(acc[0], acc[j])
    return acc[0]


def _row_sum(items: Float[Array, "*batch size lanes"]) -> Float[Array, "*batch lanes"]:
    """torch's `row_sum`: items taken 4 at a time into 4 partial sums, the leftover items into the first, then
    the partials joined in order."""
    size = items.shape[-2]
    groups = size // TORCH_SUM_ILP
    grouped = items[..., : groups * TORCH_SUM_ILP, :].reshape(*items.shape[:-2], groups, TORCH_SUM_ILP,
                                                              items.shape[-1])
    acc = _multi_row_sum([grouped[..., g, :, :] for g in range(groups)]) if groups else None
    partials = [None if acc is None else acc[..., k, :] for k in range(TORCH_SUM_ILP)]
    for i in range(groups * TORCH_SUM_ILP, size):
        partials[0] = _add(partials[0], items[..., i, :])
    total = partials[0]
    for p in partials[1:]:
        if p is not None:
            total = _add(total, p)
    return jnp.zeros(items.shape[:-2] + items.shape[-1:], items.dtype) if total is None else total


def torch_cpu_sum(x: Float[Array, "*batch n"]) -> Float[Array, "*batch"]:
    """Sum over the last axis, adding in exactly the order of torch's CPU `sum` of a contiguous row.

    Rows of at least 8 elements: 8-lane vectors go through `row_sum`; the leftover `n % 8` scalars are added into
    a scalar accumulator first, then the 8 lanes one by one. Shorter rows: `row_sum` over scalars.
    The order is a static chain of adds (XLA does not reassociate floating-point adds).
    """
    n = x.shape[-1]
    lanes = TORCH_SUM_LANES
    if n < lanes:
        return _row_sum(x[..., None])[..., 0]
    vectors = n // lanes
    lane_sums = _row_sum(x[..., : vectors * lanes].reshape(*x.shape[:-1], vectors, lanes))
    total = None
    for k in range(vectors * lanes, n):
        total = _add(total, x[..., k])
    for k in range(lanes):
        total = _add(total, lane_sums[..., k])
    return total


def torch_cpu_mean(x: Float[Array, "*batch n"]) -> Float[Array, "*batch"]:
    """torch's CPU `mean`: the cascade sum divided by the count. XLA turns a division by a broadcast scalar into a
    multiplication by its rounded reciprocal (a different result unless n is a power of 2), so the divisor is a
    full array behind a barrier."""
    total = torch_cpu_sum(x)
    return total / jax.lax.optimization_barrier(jnp.full(total.shape, x.shape[-1], x.dtype))


def reciprocal_sqrt(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`1 / sqrt(x)` as two correctly rounded operations (torch's `pow(x, -0.5)`), not XLA's fused rsqrt."""
    return 1.0 / jax.lax.optimization_barrier(jnp.sqrt(x))


# ---- GELU-tanh ------------------------------------------------------------------------------------------------

_GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # sqrt(2 / pi), as torch spells it
_GELU_KAPPA = 0.044715


def _gelu_tanh_float32_numpy(x: np.ndarray) -> np.ndarray:
    """torch's vectorised GELU-tanh in float32 operations, with SLEEF's tanh (float64 tanh rounded to float32)."""
    f = np.float32
    with np.errstate(all="ignore"):
        cube = (x * x) * x
        inner = f(_GELU_BETA) * (x + f(_GELU_KAPPA) * cube)
        t = np.tanh(inner.astype(np.float64)).astype(f)
        t = np.where(np.abs(inner) > f(SLEEF_TANHF_SATURATES_ABOVE), np.sign(inner).astype(f), t)
        return (f(0.5) * x) * (f(1.0) + t)


@functools.lru_cache(maxsize=None)
def gelu_tanh_table(dtype_name: str) -> np.ndarray:
    """GELU-tanh of every 16-bit pattern of `dtype_name` (bfloat16 or float16), as torch's CPU kernel gives it."""
    dtype = np.dtype(getattr(ml_dtypes, dtype_name) if dtype_name == "bfloat16" else dtype_name)
    x = np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float32)
    return _gelu_tanh_float32_numpy(x).astype(dtype)


def gelu_tanh_torch_cpu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """GELU-tanh rounded as torch's CPU kernel rounds it (float32 inside, one rounding to x's dtype).

    16-bit inputs: exact, by table. float32/float64: torch's operation order with SLEEF's saturation, XLA's tanh
    (XLA has no correctly rounded tanh, so this can differ from torch in the last bit).
    """
    if x.dtype in (jnp.bfloat16, jnp.float16):
        table = jnp.asarray(gelu_tanh_table(jnp.dtype(x.dtype).name))
        return table[jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)]
    cube = (x * x) * x
    inner = _GELU_BETA * (x + _GELU_KAPPA * cube)
    t = jnp.where(jnp.abs(inner) > SLEEF_TANHF_SATURATES_ABOVE, jnp.sign(inner), jnp.tanh(inner))
    return (0.5 * x) * (1.0 + t)
