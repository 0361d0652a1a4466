"""Next-token training with optax: the loss (text and multimodal), its mask, and a jitted train step.

Which positions count. Position `t` predicts token `t + 1` and is in the loss iff
- both `t` and `t + 1` are real tokens (`attention_mask`; a left pad predicting the first real token is out);
- token `t + 1` is not a multimodal soft token (an image, video or audio placeholder, by id or by a non-zero
  `mm_token_type_ids`): soft tokens are inputs, replaced by embedder outputs, and have no target. So the
  position *before* an image/audio block (`<|image>` / boi) does not predict into it, while the block's last soft
  token does predict the closing marker (`<image|>` / eoi), and text after it counts as usual;
- `loss_mask[t + 1]` is True when a `loss_mask` is given (True = "this token is a target": e.g. only the
  assistant's answer);
- tokens `t` and `t + 1` are in the same segment when `segment_ids` are given (packed sequences: the last token
  of one sequence does not predict the first of the next).
The loss is the mean cross-entropy over counted positions (over the whole batch for `batch_loss`: each token
weighs the same, whatever its sequence's length).

Precision. Logits and the cross-entropy are computed in fp32 (fp64 for fp64 models) from the final hidden
states, whatever the parameter dtype, by `g4.losses.next_token_nll`: blocked over rows and vocabulary, so the
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
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from ..layers.numerics import compute_dtype as _compute_dtype
from ..layers.policy import Remat, as_remat, with_policy
from .losses import next_token_nll
from ..model.masks import MaskMode, TokenType
from ..model.sharding import commit_like


def target_mask(
    input_ids: Int[Array, " seq"],
    config,
    *,
    attention_mask: Bool[Array, " seq"] | None = None,
    mm_token_type_ids: Int[Array, " seq"] | None = None,
    loss_mask: Bool[Array, " seq"] | None = None,
    segment_ids: Int[Array, " seq"] | None = None,
) -> Bool[Array, " seq-1"]:
    """Entry `t` says whether position `t` (predicting token `t + 1`) counts in the loss (see the module doc)."""
    real = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    soft = ((input_ids == config.image_token_id) | (input_ids == config.video_token_id)
            | (input_ids == config.audio_token_id))
    if mm_token_type_ids is not None:
        soft = soft | (mm_token_type_ids != TokenType.TEXT)
    target_ok = real & ~soft
    if loss_mask is not None:
        target_ok = target_ok & loss_mask.astype(bool)
    keep = real[:-1] & target_ok[1:]
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        keep = keep & (segment_ids[:-1] == segment_ids[1:])
    return keep


def sequence_nll(
    model, input_ids: Int[Array, " seq"], *, loss_mask: Bool[Array, " seq"] | None = None,
    mask_mode: MaskMode = "intended", **inputs
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum of the next-token cross-entropies over counted positions, their number) for one sequence.

    `inputs` are the keywords of `model(...)` (attention_mask, positions, mm_token_type_ids, segment_ids, media);
    with `segment_ids` (a packed row) no position predicts across a segment boundary.
    """
    h = model.hidden_states(input_ids, mask_mode=mask_mode, **inputs)
    h = h.astype(_compute_dtype(h.dtype))
    if model.numerics.shape_invariant:
        # the lm head's own row-at-a-time product, so the loss's logits equal decoding's bit for bit
        logits = model.logits_from_hidden(h[:-1])
        picked = jnp.take_along_axis(logits, input_ids[1:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
    else:
        # blocked over rows and vocabulary: the [seq, vocab] logits are never built (gemma4_eqx/losses.py)
        nll = next_token_nll(h[:-1], model.embed_tokens, input_ids[1:],
                             softcap=model.config.text.final_logit_softcapping)
    mask = target_mask(input_ids, model.config, attention_mask=inputs.get("attention_mask"),
                       mm_token_type_ids=inputs.get("mm_token_type_ids"), loss_mask=loss_mask,
                       segment_ids=inputs.get("segment_ids"))
    nll = jnp.where(mask, nll, 0.0)
    return nll.sum(), mask.sum().astype(nll.dtype)


def sequence_loss(model, sample: dict[str, Any], *, mask_mode: MaskMode = "intended") -> Float[Array, ""]:
    """Mean next-token cross-entropy of one sequence (`sample`: `input_ids` and `model(...)` keywords)."""
    sample = dict(sample)
    total, count = sequence_nll(model, sample.pop("input_ids"), mask_mode=mask_mode, **sample)
    return total / jnp.maximum(count, 1)


def batch_loss(model, batch: dict[str, Any], *, mask_mode: MaskMode = "intended") -> Float[Array, ""]:
    """Token-weighted mean over a stacked batch (leading batch axis on every entry, e.g. from
    `g4.batching.stack_samples`), computed with `jax.vmap` over `sequence_nll`."""
    def one(sample):
        sample = dict(sample)
        return sequence_nll(model, sample.pop("input_ids"), mask_mode=mask_mode, **sample)

    totals, counts = jax.vmap(one)(batch)
    return totals.sum() / jnp.maximum(counts.sum(), 1)


# ---- model-wide switches ----------------------------------------------------------------------------
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
