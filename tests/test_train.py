"""g4.train: which positions the loss counts, the loss itself, and the jitted optax step (filter specs, donation,
remat, mixed precision)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma4_eqx import surgery
from gemma4_eqx import train
from gemma4_eqx.generate.batching import stack_samples
from gemma4_eqx.testing import counting_compilations

from test_transforms import CONFIG, as_jax, mixed_batch, model32, tree_max_diff


@pytest.fixture(scope="module")
def batch():
    return as_jax(stack_samples(mixed_batch(CONFIG)))


# ---- the mask -------------------------------------------------------------------------------------
def test_the_loss_skips_padding_and_soft_tokens_but_predicts_the_closing_markers():
    c = CONFIG
    ids = jnp.asarray([c.text.pad_token_id, c.text.bos_token_id, 10, c.boi_token_id, c.image_token_id,
                       c.image_token_id, c.eoi_token_id, 11, c.boa_token_id, c.audio_token_id, c.eoa_token_id, 12])
    real = ids != c.text.pad_token_id
    mask = train.target_mask(ids, c, attention_mask=real)
    # position t predicts token t+1:  pad->bos  bos->10  10->boi  boi->img  img->img  img->eoi  eoi->11
    #                                 11->boa  boa->aud  aud->eoa  eoa->12
    assert mask.tolist() == [False, True, True, False, False, True, True, True, False, True, True]
    types = jnp.zeros_like(ids).at[9].set(3)  # mm_token_type_ids agree with the ids
    assert train.target_mask(ids, c, attention_mask=real, mm_token_type_ids=types).tolist() == mask.tolist()
    answer = jnp.arange(12) >= 10  # loss_mask: only the last two tokens are targets
    assert train.target_mask(ids, c, attention_mask=real, loss_mask=answer).tolist() == [False] * 9 + [True, True]


def test_the_loss_is_the_mean_cross_entropy_of_the_counted_positions(batch):
    m = model32()
    sample = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[0]), batch)  # sliced in numpy: nothing to compile

    @eqx.filter_jit  # the expected value in one program (eagerly, every operation compiles alone)
    def masked_mean_cross_entropy(m, sample):
        logits = m(**sample)
        logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, sample["input_ids"][1:, None], axis=-1)[:, 0]
        mask = train.target_mask(sample["input_ids"], CONFIG, attention_mask=sample["attention_mask"])
        return jnp.sum(jnp.where(mask, nll, 0)) / jnp.sum(mask)

    expected = float(masked_mean_cross_entropy(m, sample))
    np.testing.assert_allclose(float(eqx.filter_jit(train.sequence_loss)(m, sample)), expected, rtol=1e-5)


# ---- the step -------------------------------------------------------------------------------------
def test_loss_goes_down_over_a_few_adam_steps_and_only_the_selected_arrays_are_donated(batch):
    """A multimodal batch, remat with a policy, attention and both embedders trainable, the rest frozen.
    (That remat leaves the gradients unchanged is tested in test_transforms.py.)"""
    m = jax.tree.map(jnp.copy, model32())  # our own buffers: donation invalidates what it is given
    spec = lambda m: surgery.union(surgery.only_attention(m, "all"), surgery.only_embedders(m))
    optimizer = optax.adam(3e-3)
    step = train.make_train_step(optimizer, spec, remat="dots_saveable")
    state = train.init_optimizer(optimizer, m, spec)
    new, state, loss = step(m, state, batch)
    assert m.embed_audio.projection.embedding_projection.weight.is_deleted()  # donated, updated in place
    assert m.layers.runs[1].self_attn.q_proj.weight.is_deleted()
    assert not m.embed_tokens.is_deleted()  # frozen: neither donated nor copied
    assert new.embed_tokens is m.embed_tokens and new.layers.runs[0].mlp.up_proj.weight is m.layers.runs[0].mlp.up_proj.weight
    losses = [float(loss)]
    with counting_compilations() as compiled:  # the first step's program serves every later one
        for _ in range(7):
            new, state, loss = step(new, state, batch)
            losses.append(float(loss))
    assert compiled == [], f"{len(compiled)} compilations after the first step"
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    assert not new.layers.remat  # the model keeps its own setting; remat applies inside the step


TEXT = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(3, 1000, (3, 24)), jnp.int32)}


def test_mixed_precision_keeps_fp32_master_weights_and_an_fp32_loss():
    m, batch = model32(), TEXT
    optimizer = optax.adam(3e-3)
    step = train.make_train_step(optimizer, compute_dtype=jnp.bfloat16, donate=False)
    state = train.init_optimizer(optimizer, m)
    exact = float(eqx.filter_jit(train.batch_loss)(m, batch))
    new, state, loss = step(m, state, batch)
    assert loss.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    assert abs(float(loss) - exact) <= 0.05 * exact  # the bf16 forward is close to the fp32 one
    # an update far smaller than bf16's resolution still moves the fp32 master weights
    assert tree_max_diff(new, m) > 0
    for _ in range(4):
        new, state, last = step(new, state, batch)
    assert float(last) < float(loss)


def test_a_per_leaf_filter_is_refused_with_a_hint():
    step = train.make_train_step(optax.sgd(1e-3), eqx.is_inexact_array)
    with pytest.raises(ValueError, match="pytree of bools"):
        step(model32(), None, TEXT)


def test_the_train_step_compiles_once(batch):
    """LoRA adapters on a loaded model: the adapters `add_lora` draws and the state `optimizer.init` makes are
    uncommitted, the loaded weights are committed, and a step's outputs come back committed; jit keys its programs on
    that, so the step commits what it is given (and init_optimizer the state): the second step reuses the first's
    program. (Before, this model compiled its step twice, in notebooks/04_surgery.ipynb too.) The loaded model's own
    arrays trained (attention and embedders, with remat) are checked in the adam-steps test above."""
    m = surgery.add_lora(model32(), key=jax.random.key(0), rank=2, targets=("q_proj", "v_proj"))
    spec = surgery.only_lora(m)
    optimizer = optax.adam(1e-3)
    opt_state = train.init_optimizer(optimizer, m, spec)
    step = train.make_train_step(optimizer, spec)
    m, opt_state, _ = step(m, opt_state, batch)
    with counting_compilations() as compiled:
        for _ in range(2):
            m, opt_state, loss = step(m, opt_state, batch)
        jax.block_until_ready(loss)
    assert compiled == [], f"{len(compiled)} compilations after the first step"


def test_bf16_parameters_stay_bf16_under_an_optimizer_with_fp32_moments(batch):
    """optax's adam with `mu_dtype=float32` returns fp32 updates for bf16 weights; the step keeps the weights bf16
    (the same pytree types in and out, so the next step reuses the program and the donated buffers)."""
    # cast in numpy (ml_dtypes rounds to nearest even, as XLA does): eagerly, a cast compiles per leaf shape
    m16 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.bfloat16)) if eqx.is_inexact_array(x) else x,
                       model32())
    optimizer = optax.adam(1e-3, mu_dtype=jnp.float32)
    spec = surgery.only_full_attention(m16)
    opt_state = train.init_optimizer(optimizer, m16, spec)
    step = train.make_train_step(optimizer, spec, donate=False)
    new, opt_state, loss = step(m16, opt_state, batch)
    before = jax.tree.leaves(eqx.filter(m16, spec))
    after = jax.tree.leaves(eqx.filter(new, spec))
    assert {x.dtype for x in after} == {jnp.dtype(jnp.bfloat16)}
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))  # the step changed them
    assert np.isfinite(float(loss))
