"""A jitted optax train step for the next-token objective (`objectives`): remat, mixed precision, frozen parts.

Precision. Logits and the cross-entropy are computed in fp32 (fp64 for fp64 models) from the final hidden
states, whatever the parameter dtype, by `cross_entropy.next_token_nll`: blocked over rows and vocabulary, so the
`[seq, vocab]` logits are never materialised, forward or backward (under `numerics="invariant"` the model's own
lm head is used instead, so the loss's logits equal decoding's bit for bit).
`make_train_step(compute_dtype=jnp.bfloat16)` keeps the parameters you pass (e.g. fp32 master weights) and casts
them to bf16 inside the step: activations are bf16, gradients arrive in the master dtype (the cast's transpose)
and optax updates the master copy. With bf16 parameters and no
`compute_dtype`, everything but the loss is bf16; give optax fp32 moments then (`optax.adam(..., mu_dtype=jnp.float32)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

from ..layers.policy import Remat, as_remat, with_policy
from ..model.masks import MaskMode
from ..model.sharding import commit_like
from .objectives import batch_loss


def with_remat(model, remat: bool | str | Remat):
    """The same model with every decoder layer rematerialised as `remat` says (True, False or a
    `jax.checkpoint_policies` name): `g4.with_policy(model, as_remat(remat))`."""
    return with_policy(model, as_remat(remat))


def cast(model: PyTree, dtype) -> PyTree:
    """Every floating array cast to `dtype` (integer arrays and static fields untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)


# ---- the train step ---------------------------------------------------------------------------------
FilterSpec = PyTree[bool] | Callable[[Any], Any]


def _spec(filter_spec: FilterSpec | None, model):
    if filter_spec is None:
        return jax.tree.map(eqx.is_inexact_array, model)
    if callable(filter_spec) and not isinstance(filter_spec, eqx.Module):
        spec = filter_spec(model)  # a spec factory such as g4.surgery.only_full_attention
        if isinstance(spec, bool):
            raise ValueError("filter_spec: a function given here is called on the whole model and must return a "
                             "pytree of bools (e.g. g4.surgery.only_full_attention); for a per-leaf filter such as "
                             "eqx.is_inexact_array pass jax.tree.map(eqx.is_inexact_array, model)")
        return spec
    return filter_spec


def init_optimizer(optimizer, model, filter_spec: FilterSpec | None = None):
    """`optimizer.init` on the trainable part of `model` (the same `filter_spec` as the step).

    The state is committed to the model's devices when the model has committed arrays (`sharding.commit_like`):
    `optimizer.init` leaves some leaves (Adam's step count) uncommitted, the step returns them committed, and jit
    keys its cache on that, so the second step would compile the whole program again.
    """
    params = eqx.filter(model, _spec(filter_spec, model))
    return commit_like(optimizer.init(params), model)


def make_train_step(optimizer, filter_spec: FilterSpec | None = None, *, remat: bool | str | None = None,
                    compute_dtype=None, mask_mode: MaskMode = "intended", donate: bool = True):
    """A jitted `step(model, opt_state, batch) -> (model, opt_state, loss)` minimising `batch_loss`.

    - `filter_spec`: which arrays train (a pytree of bools, or a function of the model such as
      `g4.surgery.only_full_attention`); the rest is frozen and gets no gradient. Default: every float array.
    - `remat`: rematerialise each decoder layer in the backward pass (True or a `jax.checkpoint_policies` name
      such as "dots_saveable"); None keeps the model's own setting. The returned model keeps its setting.
    - `compute_dtype`: cast the parameters to it inside the step (mixed precision, see the module doc).
    - `donate`: the trainable arrays and the optimizer state are donated (updated in place). The arrays you pass
      are invalid afterwards, and so are other models sharing them (e.g. the one you did surgery on); frozen
      arrays and the batch are never donated. Uncommitted trainable arrays of a model that has committed ones
      (fresh adapters on a loaded model) are first committed beside them, and it is those copies that are donated.
    `opt_state` comes from `init_optimizer(optimizer, model, filter_spec)`.
    """
    if remat is not None:
        remat = as_remat(remat)

    def loss_of(params, frozen, batch):
        model = eqx.combine(params, frozen)
        if remat is not None:
            model = with_remat(model, remat)
        if compute_dtype is not None:
            model = cast(model, compute_dtype)
        return batch_loss(model, batch, mask_mode=mask_mode)

    def update(params, opt_state, frozen, batch):
        loss, grads = eqx.filter_value_and_grad(loss_of)(params, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # an optimizer whose state is wider than the parameters (fp32 moments of bf16 weights) returns wide updates:
        # keep each parameter's dtype, so the step's output matches its input (and the donated buffer is reused)
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    # (frozen, batch) first so that "all-except-first" donates exactly the params and the optimizer state
    jitted = eqx.filter_jit(lambda kept, params, opt_state: update(params, opt_state, *kept),
                            donate="all-except-first" if donate else "none")

    def step(model, opt_state, batch):
        params, frozen = eqx.partition(model, _spec(filter_spec, model))
        # Trainable arrays made eagerly on a loaded model (add_lora's adapters, a swapped layer's new weights) are
        # uncommitted and come back committed: commit them first, so the first step's program serves every step.
        params, opt_state = commit_like((params, opt_state), model)
        params, opt_state, loss = jitted((frozen, batch), params, opt_state)
        return eqx.combine(params, frozen), opt_state, loss

    return step
