"""`inputs_embeds=`: the model, `g4.score` and `g4.generate` given input embeddings equal the same calls given ids
bit for bit (text and an image prompt), gradients with respect to the embeddings match central finite differences
(fp64), a soft prompt generates with its programs compiled once, and misuse is named."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import gemma4_eqx as g4
from gemma4_eqx.testing import counting_compilations, filled_model

from test_generation import _samples, model as fixture_model

GREEDY = dict(temperature=0.0, stop_ids=(), suppress_ids=())


@pytest.fixture(scope="module")
def tiny_a():
    return fixture_model("tiny_a")


@pytest.fixture(scope="module")
def image_sample():
    (sample,) = _samples("tiny_a", "gen_image")[:1]
    sample = {k: np.asarray(v) for k, v in sample.items()}
    assert (sample["mm_token_type_ids"] == 1).sum() > 0
    return sample


_forward = eqx.filter_jit(lambda m, kw: m(**kw))


def test_model_equals_ids_bit_for_bit_text_and_image(tiny_a, image_sample):
    m = tiny_a
    ids = np.asarray(np.random.default_rng(0).integers(3, 200, 11), np.int32)
    assert np.array_equal(_forward(m, {"input_ids": ids}), _forward(m, {"inputs_embeds": m.embed(ids)}))
    # eagerly as well (no jit): same numbers
    assert np.array_equal(m(ids), m(inputs_embeds=m.embed(ids)))

    sample = dict(image_sample)
    ids = sample.pop("input_ids")
    types = sample.pop("mm_token_type_ids")
    media = {k: v for k, v in sample.items() if k in g4.Media.keys()}
    assert set(media) == {"pixel_values", "image_position_ids"}
    rest = {k: v for k, v in sample.items() if k not in media}  # attention_mask, positions
    reference = np.asarray(_forward(m, {"input_ids": ids, **rest, **media}))
    spliced = m.embed(ids, **media)
    # the embeddings alone, with the token types that say where the image block is
    alone = _forward(m, {"inputs_embeds": spliced, "mm_token_type_ids": types, **rest})
    # with the ids: they give the token types; media spliced at their placeholders over any embeddings
    with_ids = _forward(m, {"input_ids": ids, "inputs_embeds": spliced, **rest})
    resplice = _forward(m, {"input_ids": ids, "inputs_embeds": m.embed(ids, validate=False), **rest, **media})
    for got in (alone, with_ids, resplice):
        assert np.array_equal(np.asarray(got), reference)
    # without the token types the image block is not bidirectional: a different result (documented)
    assert not np.array_equal(np.asarray(_forward(m, {"inputs_embeds": spliced, **rest})), reference)


def test_gradient_with_respect_to_inputs_embeds_matches_finite_differences():
    with jax.enable_x64(True):
        cfg = g4.small_config(vocab_size=256, sliding_window=4, vision=False, audio=False)
        draw = lambda name, shape, rng: (1.0 if ("norm" in name or "layer_scalar" in name) else 0.0) + \
            0.1 * rng.standard_normal(shape)
        m = filled_model(cfg, draw, seed=3, dtype=jnp.float64)
        ids = jnp.asarray(np.random.default_rng(0).integers(3, 250, 10), jnp.int32)

        @jax.jit
        def loss(embeds):
            logits = m(inputs_embeds=embeds)
            return jax.nn.log_softmax(logits[-1])[17] + 0.01 * jnp.sum(logits[3] ** 2)

        embeds = m.embed(ids)
        grad = jax.jit(jax.grad(loss))(embeds)
        assert grad.shape == embeds.shape and float(jnp.max(jnp.abs(grad[-1]))) > 0
        rng = np.random.default_rng(1)
        for _ in range(2):
            direction = jnp.asarray(rng.standard_normal(embeds.shape))
            eps = 1e-6  # measured worst relative error over 5 directions: 1.1e-8 (1e-5: 9.7e-7, truncation)
            numeric = (loss(embeds + eps * direction) - loss(embeds - eps * direction)) / (2 * eps)
            analytic = jnp.sum(grad * direction)
            assert abs(float(numeric - analytic)) <= 1e-6 * abs(float(analytic))


def test_score_with_prompt_embeddings_equals_score_with_ids():
    m = g4.load(g4.assets.TINY_CHECKPOINT)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 200, n).astype(np.int32) for n in (5, 9, 3)]
    conts = [rng.integers(3, 200, n).astype(np.int32) for n in (4, 2, 6)]
    by_ids = g4.score(m, prompts, conts)
    by_embeds = g4.score(m, None, conts, inputs_embeds=[m.embed(p) for p in prompts])
    both = g4.score(m, prompts, conts, inputs_embeds=[m.embed(p) for p in prompts])
    for got in (by_embeds, both):
        assert np.array_equal(got.logprobs, by_ids.logprobs) and np.array_equal(got.greedy, by_ids.greedy)
    with pytest.raises(ValueError, match=r"prompts, inputs_embeds: .*prompt lengths \[5, 9, 3\]"):
        g4.score(m, prompts, conts, inputs_embeds=[m.embed(p[:-1]) for p in prompts])
    with pytest.raises(ValueError, match="inputs_embeds\\[0\\]: expected the model's activation dtype float32"):
        g4.score(m, None, conts[0], inputs_embeds=np.zeros((4, 64), np.float16))


def test_generate_with_a_soft_prompt_compiles_once_and_equals_ids():
    m = g4.load(g4.assets.TINY_CHECKPOINT)
    hidden = m.config.text.hidden_size
    ids = np.asarray(np.random.default_rng(3).integers(3, 200, 9), np.int32)
    kw = dict(max_new_tokens=6, return_result=True, return_logprobs=True, **GREEDY)
    by_ids = g4.generate(m, ids, **kw)
    by_embeds = g4.generate(m, inputs_embeds=m.embed(ids), **kw)
    assert np.array_equal(by_embeds.tokens, by_ids.tokens) and np.array_equal(by_embeds.logprobs, by_ids.logprobs)

    k = 4  # learned vectors before the prompt's own embeddings
    soft = lambda seed: jnp.concatenate([jnp.asarray(np.random.default_rng(seed).standard_normal((k, hidden)),
                                                     m.dtype), m.embed(ids)])
    first = g4.generate(m, inputs_embeds=soft(0), **kw)
    with counting_compilations() as seen:
        outs = [g4.generate(m, inputs_embeds=soft(seed), **kw) for seed in range(1, 4)]
    assert len(seen) == 0, f"{len(seen)} programs compiled for new soft prompts"
    assert len({tuple(o.tokens) for o in [first] + outs}) > 1  # the soft prompt matters
    # a batch: rows left-padded with an attention_mask; each row as it is alone
    short = m.embed(ids[:5])
    rows = np.zeros((2, 9 + k, hidden), np.float32)
    rows[0], rows[1, k + 4:] = np.asarray(soft(1)), np.asarray(short)
    mask = np.ones((2, 9 + k), bool)
    mask[1, :k + 4] = False
    batch = g4.generate(m, inputs_embeds=rows, attention_mask=mask, **kw)
    assert np.array_equal(batch.tokens[0], outs[0].tokens)
    assert np.array_equal(batch.tokens[1], g4.generate(m, ids[:5], **kw).tokens)


def test_generate_splices_media_into_given_embeddings(tiny_a, image_sample):
    sample = dict(image_sample)
    ids = sample.pop("input_ids")
    media = {k: v for k, v in sample.items() if k in g4.Media.keys()}
    reference = g4.generate(tiny_a, ids, max_new_tokens=5, **GREEDY, **sample)
    spliced = g4.generate(tiny_a, ids, inputs_embeds=tiny_a.embed(ids, validate=False), max_new_tokens=5, **GREEDY,
                          **sample)
    assert np.array_equal(np.asarray(spliced), np.asarray(reference))
    # no mm_token_type_ids: derived from the placeholders, as the model does
    no_types = {k: v for k, v in sample.items() if k != "mm_token_type_ids"}
    assert np.array_equal(np.asarray(g4.generate(tiny_a, ids, max_new_tokens=5, **GREEDY, **no_types)),
                          np.asarray(reference))
    assert media


def test_misuse_is_named(tiny_a, image_sample):
    m = tiny_a
    sample = dict(image_sample)
    ids = sample.pop("input_ids")
    media = {k: v for k, v in sample.items() if k in g4.Media.keys()}
    e = m.embed(ids, **media)
    with pytest.raises(ValueError, match="input_ids, inputs_embeds: give input_ids, inputs_embeds or both"):
        m()
    with pytest.raises(ValueError, match="pixel_values, image_position_ids: media with inputs_embeds need input_ids"):
        m(inputs_embeds=e, **media)
    # lengths that disagree: named by the model's check (or first by jaxtyping's, when the hook is on)
    with pytest.raises((ValueError, TypeCheckError), match=r"input_ids: expected shape \[%d\]|'inputs_embeds'"
                       % len(ids)):
        m(ids[:-1], inputs_embeds=e)
    with pytest.raises(ValueError, match="inputs_embeds: expected the model's activation dtype float32, found "
                                         "float16"):
        m(inputs_embeds=e.astype(jnp.float16))
    with pytest.raises(ValueError, match="media with inputs_embeds need prompt_ids"):
        g4.generate(m, inputs_embeds=e, max_new_tokens=2, **GREEDY, **media)
    with pytest.raises(ValueError, match=r"prompt_ids: expected shape \[%d\] like inputs_embeds" % len(ids)):
        g4.generate(m, ids[1:], inputs_embeds=e, max_new_tokens=2, **GREEDY)
    with pytest.raises(TypeError, match="inputs_embeds= is not supported with assistant="):
        g4.generate(m, inputs_embeds=e, max_new_tokens=2, assistant=g4.PromptLookupDrafter(ngram=2), **GREEDY)
