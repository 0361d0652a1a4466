"""KV cache, prefill/decode and generate: equal to recomputation, to transformers' greedy tokens, reproducible."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.batching import split_batch, stack_samples
from gemma4_eqx.cache import FullKV, RawKeyKV, cache_bytes
from gemma4_eqx.generation import top_k_mask, top_p_mask

import hf_reference as ref

GEN_CASES = ref.case_ids(("generated",))


@functools.lru_cache(maxsize=None)
def model(name):
    return g4.load(ref.checkpoint_dir(name))


def _greedy_with_cache(m, sample, steps, mask_mode="intended"):
    """Per-step logits from prefill + decode_step, feeding back the argmax."""
    ids = sample.pop("input_ids")
    cache = g4.KVCache.init(m.config, max_len=ids.shape[0] + steps, dtype=m.dtype)
    logits, cache = m.prefill(ids, cache, mask_mode=mask_mode, **sample)
    out = [logits]
    for _ in range(steps - 1):
        logits, cache = m.decode_step(jnp.argmax(logits).astype(jnp.int32), cache)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out])


def _recompute(m, sample, tokens, mask_mode="intended"):
    """Logits of a no-cache forward over prompt + generated tokens, at the positions that predicted them."""
    ids = np.asarray(sample["input_ids"])
    n = len(tokens)
    full = dict(sample)
    full["input_ids"] = jnp.concatenate([ids, jnp.asarray(tokens, ids.dtype)])
    if "attention_mask" in sample:
        full["attention_mask"] = jnp.concatenate([sample["attention_mask"], jnp.ones(n, bool)])
    if "positions" in sample:
        full["positions"] = jnp.concatenate([sample["positions"], sample["positions"][-1] + 1 + jnp.arange(n)])
    if "mm_token_type_ids" in sample:
        full["mm_token_type_ids"] = jnp.concatenate([sample["mm_token_type_ids"], jnp.zeros(n, jnp.int32)])
    logits = jax.jit(lambda f: m(**f, mask_mode=mask_mode))(full)
    return np.asarray(logits[ids.shape[0] - 1: ids.shape[0] - 1 + n])


def _samples(name, case_name):
    case = ref.cases(name)[case_name]
    inputs = {k: v for k, v in ref.inputs(case).items() if k != "num_frames_per_video"}
    if "prefill_position_ids" in case:
        inputs["position_ids"] = case["prefill_position_ids"]
    return [{k: jnp.asarray(v) for k, v in s.items()} for s in split_batch(inputs, model(name).config)]


@pytest.mark.parametrize("case_name", ["gen_text", "gen_image", "gen_left_pad"])
def test_cached_decoding_equals_recomputation_over_60_steps(case_name):
    """tiny_a has sliding_window 8: over 60 steps the ring buffer wraps many times.

    In fp32 the reference itself is only defined to rounding: XLA's CPU row reductions (RMSNorm means, softmax
    sums) round differently depending on how many rows they reduce, so the no-cache forward over prompt + 60
    tokens differs from the no-cache forward over prompt + 30 tokens at the same positions by up to 1.2e-5 on
    these logits of size ~20 (measured). The cache must be within 1e-5 of the recomputation or, where the
    reference's own floor is above that, within 1.5x of it (measured max 1.35e-5 against a floor of 1.19e-5);
    the fp64 test below shows the two computations are the same to 1e-12, and under `numerics="invariant"` the
    two are bit-identical in fp32 (tests/test_invariant.py).
    """
    m = model("tiny_a")
    assert m.config.text.sliding_window == 8
    for sample in _samples("tiny_a", case_name):
        stepped = _greedy_with_cache(m, dict(sample), 60)
        tokens = stepped.argmax(-1)
        again = _recompute(m, sample, tokens)
        floor = np.abs(_recompute(m, sample, tokens[:30]) - again[:30]).max()
        error = np.abs(stepped - again).max()
        assert error <= max(1e-5, 1.5 * floor) and error <= 2e-5, f"cache {error:.3g}, reference floor {floor:.3g}"


def test_video_prompt_cached_decoding_equals_recomputation():
    """A video prompt (3 frames, each its own bidirectional block on the sliding layers) through prefill + 20
    decode steps, and through `generate`, against the no-cache forward over the same tokens."""
    m = model("tiny_a")
    (sample,) = _samples("tiny_a", "mm_video")[:1]
    assert "pixel_values_videos" in sample and (np.asarray(sample["mm_token_type_ids"]) == 2).sum() > 0
    stepped = _greedy_with_cache(m, dict(sample), 20)
    tokens = stepped.argmax(-1)
    again = _recompute(m, sample, tokens)
    assert np.abs(stepped - again).max() <= 2e-5
    prompt = dict(sample)
    ids = prompt.pop("input_ids")
    generated = g4.generate(m, ids, max_new_tokens=20, temperature=0.0, stop_ids=(), suppress_ids=(), **prompt)
    assert np.array_equal(np.asarray(generated), tokens)


def test_k_and_v_in_the_cache_equal_raw_keys():
    """`raw_keys=False` stores the keys-as-values layers' finished K and V: same tokens, logits equal to rounding
    (fp32) and to 1e-12 in fp64; twice those layers' bytes."""
    m = model("tiny_a")
    (sample,) = _samples("tiny_a", "gen_image")[:1]
    prompt = dict(sample)
    ids = prompt.pop("input_ids")
    kw = dict(max_new_tokens=24, temperature=0.0, stop_ids=(), suppress_ids=())
    raw = g4.generate(m, ids, **kw, **prompt)
    separate = g4.generate(m, ids, cache_raw_keys=False, **kw, **prompt)
    assert np.array_equal(np.asarray(raw), np.asarray(separate))
    with jax.enable_x64(True):
        m64 = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        caches = [g4.KVCache.init(m64.config, max_len=ids.shape[0] + 8, dtype=jnp.float64, raw_keys=r)
                  for r in (True, False)]
        assert isinstance(caches[0].layers[-1], RawKeyKV) and isinstance(caches[1].layers[-1], FullKV)
        out = []
        for cache in caches:
            logits, cache = m64.prefill(ids, cache, **prompt)
            steps = [logits]
            for token in np.asarray(raw)[:7]:
                logits, cache = m64.decode_step(jnp.int32(token), cache)
                steps.append(logits)
            out.append(np.stack([np.asarray(x) for x in steps]))
        assert np.abs(out[0] - out[1]).max() <= 1e-12
    cfg = m.config
    full = sum(t == "full_attention" for t in cfg.text.layer_types)
    extra = full * 100 * cfg.text.global_head_dim * 4  # one more [slots, 1, head_dim] fp32 tensor per global layer
    assert cache_bytes(cfg, 100, jnp.float32, raw_keys=False) - cache_bytes(cfg, 100, jnp.float32) == extra


def test_cached_decoding_is_exact_in_float64():
    with jax.enable_x64(True):
        m = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        for case_name in ("gen_image", "gen_left_pad"):
            for sample in _samples("tiny_a", case_name):
                stepped = _greedy_with_cache(m, dict(sample), 40)
                again = _recompute(m, sample, stepped.argmax(-1))
                assert np.abs(stepped - again).max() <= 1e-12


@pytest.mark.parametrize("name, case_name", GEN_CASES)
def test_greedy_tokens_equal_transformers(name, case_name):
    case = ref.cases(name)[case_name]
    kw = ref.meta(case)["generate_kwargs"]
    mode = "intended" if kw["cache_implementation"] == "static" else "hf_forward"
    m = model(name)
    inputs = {k: v for k, v in ref.inputs(case).items() if k not in ("num_frames_per_video",)}
    samples = split_batch(inputs, m.config)
    common = dict(max_new_tokens=kw["max_new_tokens"], temperature=0.0, stop_ids=kw["eos_token_id"],
                  suppress_ids=kw["suppress_tokens"], pad_id=kw["pad_token_id"], mask_mode=mode)
    if len(samples) == 1:
        s = samples[0]
        out = np.asarray(g4.generate(m, s.pop("input_ids"), **s, **common))[None]
    else:
        batch = stack_samples(samples)
        out = np.asarray(g4.generate(m, batch.pop("input_ids"), **batch, **common))
    np.testing.assert_array_equal(out, case["generated"])


@pytest.mark.parametrize("name, case_name", GEN_CASES)
def test_step_logits_match_transformers(name, case_name):
    """The raw logits of every generation step (before suppression), through prefill + decode_step."""
    case = ref.cases(name)[case_name]
    kw = ref.meta(case)["generate_kwargs"]
    mode = "intended" if kw["cache_implementation"] == "static" else "hf_forward"
    m = model(name)
    for b, sample in enumerate(_samples(name, case_name)):
        ids = sample.pop("input_ids")
        steps = case["generated"].shape[1]
        cache = g4.KVCache.init(m.config, max_len=ids.shape[0] + steps, dtype=m.dtype)
        logits, cache = m.prefill(ids, cache, mask_mode=mode, **sample)
        for t in range(steps):
            np.testing.assert_allclose(np.asarray(logits), case["gen_logits"][b, t], atol=1e-4, rtol=0)
            if t + 1 < steps:
                logits, cache = m.decode_step(jnp.asarray(case["generated"][b, t], jnp.int32), cache)


def test_chunked_prefill_equals_whole_prefill():
    m = model("tiny_a")
    sample = _samples("tiny_a", "gen_image")[0]
    ids = sample.pop("input_ids")
    whole = g4.generate(m, ids, max_new_tokens=8, temperature=0.0, **sample)
    for chunk in (3, 5, 16):
        chunked = g4.generate(m, ids, max_new_tokens=8, temperature=0.0, prefill_chunk_size=chunk, **sample)
        np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))


def test_rows_are_padded_after_a_stop_id():
    m = model("tiny_a")
    sample = _samples("tiny_a", "gen_text")[0]
    ids = sample.pop("input_ids")
    free = np.asarray(g4.generate(m, ids, max_new_tokens=6, temperature=0.0, stop_ids=(), suppress_ids=()))
    stopped = np.asarray(g4.generate(m, ids, max_new_tokens=6, temperature=0.0, stop_ids=(int(free[1]),),
                                     suppress_ids=(), pad_id=0))
    cut = int(np.argmax(free == free[1]))
    np.testing.assert_array_equal(stopped[: cut + 1], free[: cut + 1])
    assert (stopped[cut + 1:] == 0).all()


def test_suppressed_ids_are_never_produced():
    m = model("tiny_a")
    sample = _samples("tiny_a", "gen_text")[0]
    ids = sample.pop("input_ids")
    free = np.asarray(g4.generate(m, ids, max_new_tokens=5, temperature=0.0, stop_ids=(), suppress_ids=()))
    banned = tuple(int(t) for t in set(free.tolist()))
    out = np.asarray(g4.generate(m, ids, max_new_tokens=5, temperature=0.0, stop_ids=(), suppress_ids=banned))
    assert not set(out.tolist()) & set(banned)


def test_sampling_is_reproducible_for_a_key():
    m = model("tiny_c")
    ids = jnp.asarray(ref.cases("tiny_c")["gen_text"]["input_ids"][0])
    draw = lambda seed: np.asarray(g4.generate(m, ids, max_new_tokens=12, key=jax.random.key(seed),
                                               temperature=1.5, top_k=50, top_p=0.99, stop_ids=()))
    a, b, c = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_streamer_sees_every_token_in_order():
    m = model("tiny_c")
    ids = jnp.asarray(ref.cases("tiny_c")["gen_text"]["input_ids"][0])
    seen = []
    out = g4.generate(m, ids, max_new_tokens=7, temperature=0.0, stop_ids=(), streamer=lambda t: seen.append(t[0]))
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(out))


def test_top_k_mask_against_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32)
    for k in (1, 5, 64, 299):
        kept = np.isfinite(np.asarray(top_k_mask(jnp.asarray(logits), k)))
        np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(np.argsort(-logits)[:k]))


def test_top_p_mask_against_direct_computation():
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=200)).astype(np.float32)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    for p in (0.1, 0.5, 0.9, 0.95, 0.999):
        # the smallest set of most likely tokens whose probability reaches p
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        expected = np.sort(order[:n])
        kept = np.flatnonzero(np.isfinite(np.asarray(top_p_mask(jnp.asarray(logits), p))))
        np.testing.assert_array_equal(kept, expected)


def test_bad_arguments_fail_clearly():
    m = model("tiny_c")
    ids = jnp.arange(3, 8)
    with pytest.raises(ValueError, match="key: sampling"):
        g4.generate(m, ids, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        g4.generate(m, ids, max_new_tokens=0, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        g4.generate(m, ids, temperature=1.0, top_p=0.0, key=jax.random.key(0))


def test_cache_overflow_is_an_error():
    m = model("tiny_c")
    cache = g4.KVCache.init(m.config, max_len=4, dtype=m.dtype)
    with pytest.raises(ValueError, match="does not fit a cache of max_len 4"):
        m.prefill(jnp.arange(3, 9), cache)


def test_12b_cache_memory_at_256k():
    cfg = g4.Gemma4Config.gemma4_12b()
    n = cache_bytes(cfg, 262_144, jnp.bfloat16)
    sliding = 40 * 1024 * 8 * 256 * 2 * 2  # ring buffer: K and V, independent of the context
    full = 8 * 262_144 * 1 * 512 * 2  # one raw key projection per slot serves as K and V
    assert sliding + full < n < sliding + full + 4 * 2**20  # plus slot bookkeeping
    assert cache_bytes(cfg, 2_048, jnp.bfloat16) - 8 * 2_048 * 512 * 2 > sliding - 2**20


def test_generate_runs_in_float64():
    with jax.enable_x64(True):
        m = g4.load(ref.checkpoint_dir("tiny_c"), dtype=jnp.float64)
        ids = jnp.asarray(ref.cases("tiny_c")["gen_text"]["input_ids"][0])
        out = g4.generate(m, ids, max_new_tokens=4, temperature=0.0, stop_ids=())
        assert out.shape == (4,)
