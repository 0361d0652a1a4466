"""Taps while generating: steering vectors added at a layer to every prompt and generated token give, token by token,
what a no-cache forward with the same vector added at every position gives (fp64, 1e-10: tokens, log-probs, the
residuals and attention read), new vectors compile nothing, and with taps off the generation programs are the
untapped ones (lowered text compared, as tests/test_taps.py does for the forward)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate import loop
from gemma4_eqx.generate.sampling import SamplingParams
from gemma4_eqx.model import decode
from gemma4_eqx.testing import counting_compilations, filled_model

TIGHT = dict(rtol=1e-10, atol=1e-10)
LAYER = 2  # the steered layer (sliding); layer 5 is the global one
NEW = 12
GREEDY = dict(temperature=0.0, stop_ids=(), suppress_ids=())
READS = dict(residual=(LAYER, 5), attention=(1, 5))


def _draw(name, shape, rng):
    scale = 1.0 if ("norm" in name or "layer_scalar" in name) else 0.0
    return scale + 0.1 * rng.standard_normal(shape)


@pytest.fixture(scope="module")
def model():
    jax.config.update("jax_enable_x64", True)
    # 6 layers (5 sliding + 1 global), window 4: over 10 + 12 tokens the sliding layers' ring wraps
    cfg = g4.small_config(vocab_size=256, sliding_window=4, vision=False, audio=False)
    yield filled_model(cfg, _draw, seed=3, dtype=jnp.float64)
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 250, n).astype(np.int32) for n in (10, 7)]


def _batch(prompts, rng=None):
    """The prompts left-padded into one [2, 10] batch with its attention mask (new contents when `rng` is given)."""
    lengths = [len(p) for p in prompts]
    if rng is not None:
        prompts = [rng.integers(3, 250, n).astype(np.int32) for n in lengths]
    ids = np.zeros((len(prompts), max(lengths)), np.int32)
    mask = np.zeros(ids.shape, bool)
    for b, p in enumerate(prompts):
        ids[b, ids.shape[1] - len(p):], mask[b, ids.shape[1] - len(p):] = p, True
    return prompts, ids, mask


_forward = eqx.filter_jit(lambda m, ids, taps: m(ids, taps=taps))


def _steer(model, vectors, **kw):
    return g4.Taps(add=(LAYER,), values=vectors, **{**READS, **kw})


def test_steering_while_generating_equals_a_no_cache_forward_steered_everywhere(model, prompts):
    hidden = model.config.text.hidden_size
    vectors = 2.0 * np.random.default_rng(1).standard_normal((2, 1, hidden))  # one per prompt row
    _, ids, mask = _batch(prompts)
    out = g4.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, taps=_steer(model, vectors),
                      return_result=True, return_logprobs=True, **GREEDY)
    p = out.prefilled
    heads = model.config.text.num_attention_heads
    assert out.residual.shape == (2, NEW, 2, hidden)
    assert out.attention.shape == (2, NEW, 2, heads, out.cache_slots)
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        full = jnp.asarray(np.concatenate([prompt, out.tokens[b, :-1]]))
        logits, tapped = _forward(model, full, _steer(model, vectors[b]))
        at = slice(n - 1, n - 1 + NEW)  # the positions that chose the new tokens
        np.testing.assert_array_equal(out.tokens[b], np.asarray(logits[at]).argmax(-1))
        np.testing.assert_allclose(out.logprobs[b], np.asarray(jax.nn.log_softmax(logits[at]))[
            np.arange(NEW), out.tokens[b]], **TIGHT)
        np.testing.assert_allclose(out.residual[b], np.asarray(tapped.residual[:, at]).transpose(1, 0, 2), **TIGHT)
        # attention over the cache's slots: this row's prompt starts at slot p - n, each token follows
        attention = out.attention[b]  # [new, reads, heads, slots]
        keys = slice(p - n, p - n + len(full))
        np.testing.assert_allclose(attention[..., keys], np.asarray(tapped.attention[:, :, at]).transpose(2, 0, 1, 3),
                                   **TIGHT)
        assert np.abs(attention[..., :p - n]).max() == 0 and np.abs(attention[..., p - n + len(full):]).max() == 0
        # the vector does steer: the same tokens unsteered get other logits
        assert np.abs(np.asarray(logits) - np.asarray(_forward(model, full, g4.Taps())[0])).max() > 1e-2


def test_ten_steered_calls_compile_nothing_new(model, prompts):
    hidden = model.config.text.hidden_size
    rng = np.random.default_rng(2)
    kw = dict(max_new_tokens=NEW, return_result=True, **GREEDY)
    _, ids, mask = _batch(prompts)
    g4.generate(model, ids, attention_mask=mask, taps=_steer(model, rng.standard_normal((2, 1, hidden))), **kw)
    with counting_compilations() as seen:
        outs = []
        for call in range(10):
            _, ids, mask = _batch(prompts, rng if call % 2 else None)  # new prompt contents every other call
            vectors = (call + 1) * rng.standard_normal((1, hidden))  # shared by both rows (broadcast)
            settings = dict(kw, temperature=0.5 * (call % 3), key=jax.random.key(call))
            outs.append(g4.generate(model, ids, attention_mask=mask, taps=_steer(model, vectors), **settings))
    assert len(seen) == 0, f"{len(seen)} programs compiled by new steering vectors"
    assert len({o.tokens.tobytes() for o in outs}) > 5  # the vectors (and settings) do change the output


def test_a_read_at_a_patched_layer_is_the_patch_for_every_token(model, prompts):
    """`patch` (replace) through generate: the residual read at the patched layer is the vector, exactly, at the
    position that chose every token; one prompt (1-D) gives [new, reads, hidden]."""
    hidden = model.config.text.hidden_size
    vector = np.random.default_rng(3).standard_normal(hidden)
    out = g4.generate(model, prompts[0], max_new_tokens=NEW, return_result=True, **GREEDY,
                      taps=g4.Taps(patch=(3,), values=vector, residual=(3, 4)))
    assert out.residual.shape == (NEW, 2, hidden) and out.attention is None
    assert np.array_equal(out.residual[:, 0], np.broadcast_to(vector, (NEW, hidden)))
    logits, tapped = _forward(model, jnp.asarray(np.concatenate([prompts[0], out.tokens[:-1]])),
                              g4.Taps(patch=(3,), values=vector[None], residual=(3, 4)))
    n = len(prompts[0])
    np.testing.assert_array_equal(out.tokens, np.asarray(logits[n - 1:]).argmax(-1))
    np.testing.assert_allclose(out.residual, np.asarray(tapped.residual[:, n - 1:]).transpose(1, 0, 2), **TIGHT)


def _lowered(fn, *args, **kwargs) -> str:
    return fn.lower(*args, **kwargs).as_text(debug_info=False)


def test_taps_off_leave_the_generation_programs_unchanged(model, prompts):
    """The prefill, the decode chunk and `model.decode_step` with no taps, `taps=None` or an empty `g4.Taps()`
    lower to the same text; a steering tap changes it (so the comparison can fail)."""
    hidden = model.config.text.hidden_size
    _, ids, mask = _batch(prompts)
    batch = {"input_ids": np.pad(ids, [(0, 0), (6, 0)]), "attention_mask": np.pad(mask, [(0, 0), (6, 0)])}
    batch["positions"] = np.maximum(np.cumsum(batch["attention_mask"], 1) - 1, 0).astype(np.int32)
    params = SamplingParams.make(256, temperature=0.0, top_k=0, top_p=1.0, pad_id=0)
    kw = dict(chunk=8, bounds=None, max_len=256, mask_mode="intended", cache_dtype=jnp.dtype(jnp.float64),
              raw_keys=True)
    args = (model, None, batch, np.int32(2), np.int32(NEW), jax.random.key(0), params)
    steer = g4.Taps(add=(LAYER,), values=np.ones((2, 1, hidden)))
    plain = _lowered(loop.prefill_rows, *args, **kw)
    assert _lowered(loop.prefill_rows, *args, **kw, taps=None) == plain
    assert _lowered(loop.prefill_rows, *args, **kw, taps=g4.Taps()) == plain
    assert _lowered(loop.prefill_rows, *args, **kw, taps=steer) != plain

    state, _ = jax.eval_shape(lambda: loop.prefill_rows(*args, **kw))
    state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state, is_leaf=lambda x: x is state.key)
    state = eqx.tree_at(lambda s: s.key, state, jax.random.key(0))
    plain = _lowered(loop.decode_chunk, model, state, params, np.int32(4))
    assert _lowered(loop.decode_chunk, model, state, params, np.int32(4), taps=None) == plain
    assert _lowered(loop.decode_chunk, model, state, params, np.int32(4), taps=g4.Taps()) == plain
    assert _lowered(loop.decode_chunk, model, state, params, np.int32(4), taps=steer) != plain

    cache = g4.KVCache.init(model.config, max_len=32, dtype=jnp.float64)
    plain = _lowered(decode.decode_step_jitted, model, jnp.int32(3), cache)
    assert _lowered(decode.decode_step_jitted, model, jnp.int32(3), cache, g4.Taps()) == plain
    assert _lowered(decode.decode_step_jitted, model, jnp.int32(3), cache, g4.Taps(residual=(1,))) != plain


def test_misuse_is_named(model, prompts):
    hidden = model.config.text.hidden_size
    ids = prompts[0]
    vec = np.zeros((1, hidden))
    with pytest.raises(ValueError, match="taps.where: generate writes at every prompt and generated token"):
        g4.generate(model, ids, max_new_tokens=2, **GREEDY,
                    taps=g4.Taps(add=(1,), values=np.zeros((1, len(ids), hidden)), where=np.ones((1, len(ids)), bool)))
    with pytest.raises(ValueError, match="taps: residual / attention reads come back in a GenerationResult"):
        g4.generate(model, ids, max_new_tokens=2, taps=g4.Taps(residual=(1,)), **GREEDY)
    with pytest.raises(ValueError, match=r"taps.values: expected shape \[1, 64\] .* or \[1, 1, 64\]"):
        g4.generate(model, ids, max_new_tokens=2, taps=g4.Taps(add=(1,), values=np.zeros((1, 3, hidden))), **GREEDY)
    with pytest.raises(ValueError, match="taps.values: expected the activation dtype float64, found float32"):
        g4.generate(model, ids, max_new_tokens=2, taps=g4.Taps(add=(1,), values=vec.astype(np.float32)), **GREEDY)
    with pytest.raises(ValueError, match=r"taps.add: layers \[9\] do not exist"):
        g4.generate(model, ids, max_new_tokens=2, taps=g4.Taps(add=(9,), values=vec), **GREEDY)
    with pytest.raises(TypeError, match="taps= is not supported with assistant="):
        g4.generate(model, ids, max_new_tokens=2, taps=g4.Taps(add=(1,), values=vec),
                    assistant=g4.PromptLookupDrafter(ngram=2), **GREEDY)
