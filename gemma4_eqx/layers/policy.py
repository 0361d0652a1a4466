"""Run-time modes as modules: numerics, the attention kernel and the remat policy.

A policy is a small `eqx.Module` with no array leaves, held as an ordinary field by the layers that use it and
called by them (`self.numerics.matmul(x, w)`, `self.kernel.attend(q, k, v, mask, band)`). `jax.jit` and
`eqx.filter_jit` see it as part of the tree's structure, so two models that differ only in a policy compile
separately and a model never needs a flag tested in several places.

`with_policy(tree, policy)` swaps every policy of the same family (`Numerics`, `AttentionKernel`, `Remat`) in a
whole tree with `eqx.tree_at`, the way `eqx.nn.inference_mode` flips dropout. Before swapping it asks every module
that holds such a policy whether it can honour the new one (`refuses`), and raises `PolicyError` naming the module
(by its path in the tree) when one cannot. Nothing is copied or mutated: the result is a new tree sharing the
arrays.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .kernels import (
    backend,
    banded_attention,
    cudnn_accepts,
    fused_attention,
    in_bands,
    ordered_attention,
    xla_attention,
)
from .numerics import (
    compute_dtype,
    gelu_tanh_torch_cpu,
    reciprocal_sqrt,
    rowwise_matmul,
    torch_cpu_mean,
    warn_if_bf16_rounding_differs,
)
from .rope import apply_rope, apply_rope_rounded


class PolicyError(ValueError):
    """A module cannot run under the policy it was asked to take."""


class Policy(eqx.Module):
    """A run-time mode. Subclasses define `family` (the base class swapped together) and `name`."""

    name: ClassVar[str]

    @classmethod
    def family(cls) -> type[Policy]:
        """The direct subclass of `Policy` this policy belongs to (`Numerics`, `AttentionKernel`, `Remat`)."""
        for base in cls.__mro__:
            if Policy in base.__bases__:
                return base
        raise TypeError(f"{cls.__name__} is not a policy family member")


Step = tuple[str, Any]  # ("attr", field name) or ("item", index or key)


def _walk(tree: Any, steps: tuple[Step, ...] = ()) -> Iterator[tuple[tuple[Step, ...], eqx.Module]]:
    """Every `eqx.Module` inside `tree` (the tree itself included), with the steps that reach it."""
    if isinstance(tree, eqx.Module):
        yield steps, tree
        for f in dataclasses.fields(tree):
            yield from _walk(getattr(tree, f.name, None), steps + (("attr", f.name),))
    elif isinstance(tree, (tuple, list)):
        for i, x in enumerate(tree):
            yield from _walk(x, steps + (("item", i),))
    elif isinstance(tree, dict):
        for k, x in tree.items():
            yield from _walk(x, steps + (("item", k),))


def _follow(tree: Any, steps: tuple[Step, ...]) -> Any:
    for kind, key in steps:
        tree = getattr(tree, key) if kind == "attr" else tree[key]
    return tree


def _path(steps: tuple[Step, ...]) -> str:
    out = ""
    for kind, key in steps:
        out += f".{key}" if kind == "attr" else f"[{key!r}]"
    return out.lstrip(".") or "model"


def holders(tree: Any, family: type[Policy]) -> list[tuple[tuple[Step, ...], eqx.Module]]:
    """(steps to the policy field, the module holding it) for every field of `tree` holding a `family` policy."""
    out = []
    for steps, module in _walk(tree):
        if isinstance(module, Policy):
            continue
        for f in dataclasses.fields(module):
            if isinstance(getattr(module, f.name, None), family):
                out.append((steps + (("attr", f.name),), module))
    return out


def policies(tree: Any, family: type[Policy]) -> set[Policy]:
    """The distinct policies of `family` held in `tree`."""
    return {_follow(tree, steps) for steps, _ in holders(tree, family)}


def with_policy(tree: Any, policy: Policy) -> Any:
    """`tree` with every policy of `policy`'s family replaced by `policy` (same arrays, nothing mutated).

    Raises `PolicyError` naming the first module that refuses it (see `refuses` on the layers).
    """
    family = type(policy).family()
    found = holders(tree, family)
    for steps, module in found:
        refuses = getattr(type(module), "refuses", None)
        reason = refuses(module, policy) if refuses is not None else None
        if reason is not None:
            raise PolicyError(f"{_path(steps[:-1])} ({type(module).__name__}) cannot run under "
                              f"{family.__name__} {policy.name!r}: {reason}")
    if not found:
        return tree
    where = lambda t: tuple(_follow(t, steps) for steps, _ in found)
    return eqx.tree_at(where, tree, replace_fn=lambda _: policy, is_leaf=lambda x: isinstance(x, family))


# ---- numerics ---------------------------------------------------------------------------------------------------
class Numerics(Policy):
    """How the layers round: `XLA` (default), `TorchCPU` (transformers' CPU run, bit for bit) or `Invariant` (a
    token's numbers independent of the call's shape). See `layers/numerics.py` for what each one does."""

    #: a token's numbers do not depend on the call's shape: the sliding layers read their ring oldest first (a
    #: fixed key order whatever the ring's start) and the loss keeps the model's own lm head
    shape_invariant: ClassVar[bool] = False

    @abc.abstractmethod
    def matmul(self, x: Float[Array, "*batch k"], w: Float[Array, "k n"]) -> Float[Array, "*batch n"]:
        """`x @ w` (the projections)."""

    @abc.abstractmethod
    def tied_head(self, h: Float[Array, "*batch hidden"], table: Float[Array, "vocab hidden"]) -> Float[Array, "*batch vocab"]:
        """`h @ table.T` (the tied lm head)."""

    @abc.abstractmethod
    def inverse_rms(self, x: Float[Array, "*batch dim"], eps: float) -> Float[Array, "*batch 1"]:
        """`(mean(x^2) + eps) ** -0.5` over the last axis (RMSNorm's scale)."""

    @abc.abstractmethod
    def gelu_tanh(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """GELU-tanh, fp32 inside, rounded once to x's dtype."""

    @abc.abstractmethod
    def attend(self, q: Float[Array, "q_seq heads head_dim"], k: Float[Array, "kv_seq kv_heads head_dim"],
               v: Float[Array, "kv_seq kv_heads head_dim"], mask: Bool[Array, "q_seq kv_seq"], band: int | None,
               kernel: AttentionKernel) -> Float[Array, "q_seq heads head_dim"]:
        """Softmax attention; `kernel` is the layer's kernel policy, used unless the numerics need their own."""

    def rope(self, x: Float[Array, "seq heads head_dim"], cos: Float[Array, "seq head_dim"],
             sin: Float[Array, "seq head_dim"]) -> Float[Array, "seq heads head_dim"]:
        """The rotary embedding `x * cos + rotate_half(x) * sin` (`layers/rope.py`)."""
        return apply_rope(x, cos, sin)

    def refuses_kernel(self, kernel: AttentionKernel) -> str | None:
        """Why this numerics mode cannot run with `kernel` (None when it can)."""
        return None

    def check_dtype(self, dtype) -> None:
        """Warn when this mode cannot keep its promise in `dtype` under the current XLA flags."""


def _plain_inverse_rms(x, eps):
    # pow(., -0.5) rather than rsqrt, as transformers does to stay close to JAX references.
    return jnp.power(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps, -0.5)


def _ordered_inverse_rms(x, eps):
    # The barrier keeps LLVM from contracting the squares into the sum's adds (fused multiply-adds).
    square = jax.lax.optimization_barrier(x * x)
    return reciprocal_sqrt(torch_cpu_mean(square) + eps)[..., None]


def _fp32_gelu(x):
    # The activation is evaluated in fp32 and rounded once, as torch's reduced-precision GELU kernel does.
    return jax.nn.gelu(x.astype(compute_dtype(x.dtype)), approximate=True).astype(x.dtype)


class XLA(Numerics):
    """XLA chooses summation orders and fusions (fast, any backend; the default)."""

    name: ClassVar[str] = "xla"

    def matmul(self, x, w):
        return jnp.matmul(x, w)

    def tied_head(self, h, table):
        # One vector (a decode step, a prefill's last token; vmapped over a batch): contract the table's own minor
        # axis. `h @ table.T` made XLA:CPU copy the whole [vocab, hidden] table into a transposed buffer on every
        # call (benchmarks/RESULTS.md). Many rows keep the matmul (the copy is shared by the rows).
        if h.ndim == 1:
            return jnp.einsum("vh,h->v", table, h)
        return jnp.matmul(h, table.T)

    def inverse_rms(self, x, eps):
        return _plain_inverse_rms(x, eps)

    def gelu_tanh(self, x):
        return _fp32_gelu(x)

    def attend(self, q, k, v, mask, band, kernel):
        return kernel.attend(q, k, v, mask, band)


class TorchCPU(Numerics):
    """transformers' CPU rounding: RMSNorm sums in torch's cascade order with a two-op `1/sqrt`, GELU-tanh rounds
    as torch's kernel (16-bit inputs by table), RoPE's products round before their sum. A verification mode."""

    name: ClassVar[str] = "torch_cpu"

    def matmul(self, x, w):
        return jnp.matmul(x, w)

    def tied_head(self, h, table):
        return jnp.matmul(h, table.T)

    def inverse_rms(self, x, eps):
        return _ordered_inverse_rms(x, eps)

    def gelu_tanh(self, x):
        return gelu_tanh_torch_cpu(x)

    def rope(self, x, cos, sin):
        # torch multiplies and adds in separate kernels: no fused multiply-add.
        return apply_rope_rounded(x, cos, sin)

    def attend(self, q, k, v, mask, band, kernel):
        return kernel.attend(q, k, v, mask, band)

    def check_dtype(self, dtype) -> None:
        warn_if_bf16_rounding_differs(dtype)


class Invariant(Numerics):
    """A token's numbers do not depend on the call's shape: matmuls one row at a time, RMSNorm in a fixed order,
    attention one key at a time in key order (`kernels.ordered_attention`), the ring read oldest first. Cached
    decoding then equals the no-cache forward bit for bit. Slow (sequential loops); needs the XLA kernel."""

    name: ClassVar[str] = "invariant"
    shape_invariant: ClassVar[bool] = True

    def matmul(self, x, w):
        return rowwise_matmul(x, w)

    def tied_head(self, h, table):
        # The transposed table is materialised behind a barrier: with the transpose folded into the dot, XLA picked
        # another bf16 kernel when jit saw the weights as constants than as arguments.
        return rowwise_matmul(h, jax.lax.optimization_barrier(table.T))

    def inverse_rms(self, x, eps):
        return _ordered_inverse_rms(x, eps)

    def gelu_tanh(self, x):
        return _fp32_gelu(x)

    def rope(self, x, cos, sin):
        return apply_rope_rounded(x, cos, sin)

    def attend(self, q, k, v, mask, band, kernel):
        if in_bands(q, k, band):
            return banded_attention(q, k, v, mask, band, kernel=ordered_attention)
        return ordered_attention(q, k, v, mask)

    def refuses_kernel(self, kernel):
        if not isinstance(kernel, XLAKernel):
            return (f"numerics='invariant' attends with its own ordered kernel and needs attention "
                    f"implementation 'xla', found {kernel.name!r}")
        return None


NUMERICS: dict[str, type[Numerics]] = {cls.name: cls for cls in (XLA, TorchCPU, Invariant)}


def as_numerics(numerics: str | Numerics) -> Numerics:
    """A numerics policy from its name (`"xla"`, `"torch_cpu"`, `"invariant"`) or as given."""
    if isinstance(numerics, Numerics):
        return numerics
    if numerics not in NUMERICS:
        raise ValueError(f"numerics: expected one of {tuple(NUMERICS)}, found {numerics!r}")
    return NUMERICS[numerics]()


# ---- attention kernels ------------------------------------------------------------------------------------------
class AttentionKernel(Policy):
    """Which softmax-attention implementation a layer calls (`layers/kernels.py`)."""

    @abc.abstractmethod
    def attend(self, q: Float[Array, "q_seq heads head_dim"], k: Float[Array, "kv_seq kv_heads head_dim"],
               v: Float[Array, "kv_seq kv_heads head_dim"], mask: Bool[Array, "q_seq kv_seq"],
               band: int | None) -> Float[Array, "q_seq heads head_dim"]:
        """`band`: the mask is a pure sliding window of this size (text-only sliding layers)."""


class XLAKernel(AttentionKernel):
    """Ours (`kernels.xla_attention`): rounds as transformers' eager path; in bands for long sliding calls,
    streamed for very long global ones. The default."""

    name: ClassVar[str] = "xla"

    def attend(self, q, k, v, mask, band):
        return xla_attention(q, k, v, mask, band)


class CuDNNKernel(AttentionKernel):
    """cuDNN's fused flash attention (`jax.nn.dot_product_attention`) for every call whose shape it takes
    (bf16/f16, head_dim <= 256: the 40 sliding layers of the 12B); other calls stay on the XLA kernel. Needs a
    GPU backend."""

    name: ClassVar[str] = "cudnn"

    def attend(self, q, k, v, mask, band):
        if backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU backend; JAX's default backend is "
                             f"{backend()!r} (use 'xla' or 'auto')")
        if cudnn_accepts(q, k):
            return fused_attention(q, k, v, mask)
        return xla_attention(q, k, v, mask, band)


class AutoKernel(AttentionKernel):
    """cuDNN for GPU prefill (more than one query) where cuDNN takes the call, the XLA kernel otherwise (for one
    query the XLA path is faster on a GPU)."""

    name: ClassVar[str] = "auto"

    def attend(self, q, k, v, mask, band):
        if backend() == "gpu" and q.shape[0] > 1 and cudnn_accepts(q, k):
            try:
                return fused_attention(q, k, v, mask)
            except (NotImplementedError, RuntimeError, ValueError):  # cuDNN declined this call while tracing
                pass
        return xla_attention(q, k, v, mask, band)


KERNELS: dict[str, type[AttentionKernel]] = {cls.name: cls for cls in (XLAKernel, CuDNNKernel, AutoKernel)}


def as_kernel(kernel: str | AttentionKernel) -> AttentionKernel:
    """An attention kernel policy from its name (`"xla"`, `"cudnn"`, `"auto"`) or as given."""
    if isinstance(kernel, AttentionKernel):
        return kernel
    if kernel not in KERNELS:
        raise ValueError(f"attention implementation: expected one of {tuple(KERNELS)}, found {kernel!r}")
    return KERNELS[kernel]()


# ---- rematerialisation --------------------------------------------------------------------------------------------
# Policies by name (`jax.checkpoint_policies`) that need no arguments.
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


class Remat(Policy):
    """Whether each decoder layer body is rematerialised in the backward pass, and with which
    `jax.checkpoint_policies` policy (`None`: `jax.checkpoint`'s default, saving nothing but the layer's inputs)."""

    enabled: bool = eqx.field(static=True, default=False)
    policy: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.policy is not None and self.policy not in REMAT_POLICIES:
            raise ValueError(f"remat: expected a bool or one of {REMAT_POLICIES} (jax.checkpoint_policies), "
                             f"found {self.policy!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "off" if not self.enabled else (self.policy or "on")

    def __bool__(self) -> bool:
        return self.enabled

    def wrap(self, body: Callable) -> Callable:
        """`body` under `jax.checkpoint` (with the named policy) when enabled."""
        if not self.enabled:
            return body
        if self.policy is None:
            return jax.checkpoint(body)
        return jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, self.policy))


def as_remat(remat: bool | str | Remat) -> Remat:
    """A remat policy from `False`, `True`, a policy name (`"dots_saveable"`, ...) or as given."""
    if isinstance(remat, Remat):
        return remat
    if isinstance(remat, bool):
        return Remat(enabled=remat)
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return Remat(enabled=True, policy=remat)
    raise ValueError(f"remat: expected a bool or one of {REMAT_POLICIES} (jax.checkpoint_policies), found {remat!r}")
