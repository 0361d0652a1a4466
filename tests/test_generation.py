"""KV cache, prefill/decode and generate: equal to recomputation, to transformers' greedy tokens, reproducible."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.batching import split_batch, stack_samples
from gemma4_eqx.model.cache import cache_bytes
from gemma4_eqx.generate.sampling import top_k_mask, top_p_mask
from gemma4_eqx.generate.sampling import ordered_log_softmax

import hf_reference as ref

GEN_CASES = ref.case_ids(("generated",))


@functools.lru_cache(maxsize=None)
def model(name):
    return g4.load(ref.checkpoint_dir(name))


# One cache capacity for every hand-driven prefill + decode_step check here and in test_generation_cache.py (the
# longest needs 34 + 60 slots): the jitted decode step is then compiled once per model, not once per prompt length.
# The capacity only adds masked full-attention slots; the ring of the sliding layers (window 8 or 16) is the same.
CACHE_SLOTS = 128


@eqx.filter_jit
def _forward(m, inputs, mask_mode):
    """A no-cache forward; the model is an argument, so every call with the same shapes reuses one program."""
    return m(**inputs, mask_mode=mask_mode)


def _greedy_with_cache(m, sample, steps, mask_mode="intended"):
    """Per-step logits from prefill + decode_step, feeding back the argmax."""
    ids = sample.pop("input_ids")
    cache = g4.KVCache.init(m.config, max_len=CACHE_SLOTS, dtype=m.dtype)
    assert ids.shape[0] + steps <= CACHE_SLOTS
    logits, cache = m.prefill(ids, cache, mask_mode=mask_mode, **sample)
    out = [np.asarray(logits)]
    for _ in range(steps - 1):
        logits, cache = m.decode_step(jnp.int32(np.argmax(out[-1])), cache)
        out.append(np.asarray(logits))
    return np.stack(out)


def _recompute(m, sample, tokens, mask_mode="intended"):
    """Logits of a no-cache forward over prompt + generated tokens, at the positions that predicted them."""
    sample = {k: np.asarray(v) for k, v in sample.items()}  # the inputs are joined on the host
    ids = sample["input_ids"]
    n = len(tokens)
    full = dict(sample)
    full["input_ids"] = np.concatenate([ids, np.asarray(tokens, ids.dtype)])
    if "attention_mask" in sample:
        full["attention_mask"] = np.concatenate([sample["attention_mask"], np.ones(n, sample["attention_mask"].dtype)])
    if "positions" in sample:
        pos = sample["positions"]
        full["positions"] = np.concatenate([pos, pos[-1] + 1 + np.arange(n, dtype=pos.dtype)])
    if "mm_token_type_ids" in sample:
        types = sample["mm_token_type_ids"]
        full["mm_token_type_ids"] = np.concatenate([types, np.zeros(n, types.dtype)])
    logits = _forward(m, full, mask_mode)
    return np.asarray(logits[ids.shape[0] - 1: ids.shape[0] - 1 + n])


def _samples(name, case_name):
    case = ref.cases(name)[case_name]
    inputs = {k: v for k, v in ref.inputs(case).items() if k != "num_frames_per_video"}
    if "prefill_position_ids" in case:
        inputs["position_ids"] = case["prefill_position_ids"]
    return [{k: jnp.asarray(v) for k, v in s.items()} for s in split_batch(inputs, model(name).config)]


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
        cache = g4.KVCache.init(m.config, max_len=CACHE_SLOTS, dtype=m.dtype)
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
    mask = jax.jit(top_k_mask)  # k is traced: one program for the four values
    for k in (1, 5, 64, 299):
        kept = np.isfinite(np.asarray(mask(jnp.asarray(logits), k)))
        np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(np.argsort(-logits)[:k]))


def test_top_p_mask_against_direct_computation():
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=200)).astype(np.float32)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mask = jax.jit(top_p_mask)  # p is traced: one program for the five values
    for p in (0.1, 0.5, 0.9, 0.95, 0.999):
        # the smallest set of most likely tokens whose probability reaches p
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        expected = np.sort(order[:n])
        kept = np.flatnonzero(np.isfinite(np.asarray(mask(jnp.asarray(logits), p))))
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


# ---- the result object, log-probs, defaults, checks, processor batches ----------------------------------------
def test_result_object_gives_lengths_and_rows_without_pads():
    m = model("tiny_a")
    sample = _samples("tiny_a", "gen_text")[0]
    ids = sample.pop("input_ids")
    free = np.asarray(g4.generate(m, ids, max_new_tokens=6, temperature=0.0, stop_ids=(), suppress_ids=()))
    stop = int(free[2])
    out = g4.generate(m, ids, max_new_tokens=6, temperature=0.0, stop_ids=(stop,), suppress_ids=(), pad_id=0,
                      return_result=True)
    cut = int(np.argmax(free == stop)) + 1
    assert isinstance(out, g4.GenerationResult) and out.tokens.shape == (6,) and int(out.lengths) == cut
    np.testing.assert_array_equal(out.sequences[0], free[:cut])
    assert out.logprobs is None  # only with return_logprobs


def test_logprobs_are_the_log_softmax_of_the_models_logits():
    m = model("tiny_c")
    ids = jnp.asarray(ref.cases("tiny_c")["gen_text"]["input_ids"][0])
    out = g4.generate(m, ids, max_new_tokens=10, key=jax.random.key(3), temperature=1.0, top_k=40, top_p=0.9,
                      stop_ids=(), suppress_ids=(), return_logprobs=True)
    full = jnp.concatenate([ids, jnp.asarray(out.tokens)])
    lp = np.asarray(jax.nn.log_softmax(_forward(m, {"input_ids": full}, "intended")))[len(ids) - 1: -1]
    np.testing.assert_allclose(out.logprobs, lp[np.arange(10), out.tokens], atol=2e-5, rtol=0)
    np.testing.assert_allclose(out.top_logprobs[:, 0], lp.max(-1), atol=2e-5, rtol=0)
    assert (out.sampling_logprobs >= out.logprobs - 1e-5).all()  # at T=1 filtering only concentrates the mass


@pytest.mark.machine_code
def test_logprobs_equal_a_training_forward_bit_for_bit_under_invariant_numerics():
    """Under numerics="invariant" the cached logits equal the no-cache forward's, so the returned log-probs equal
    the training forward's at those positions exactly (text, and a left-padded batch). The log-softmax is
    `ordered_log_softmax` on both sides: XLA's own `jax.nn.log_softmax` rounds a row differently depending on how
    many rows the call holds (checked below), so no cached decoder could match it bit for bit."""
    m = model("tiny_a").with_numerics("invariant")
    sample = _samples("tiny_a", "gen_text")[0]
    ids = np.asarray(sample["input_ids"])
    out = g4.generate(m, ids, max_new_tokens=12, temperature=0.0, stop_ids=(), suppress_ids=(),
                      return_logprobs=True)
    full = jnp.concatenate([jnp.asarray(ids), jnp.asarray(out.tokens)])
    @jax.jit
    def both(f):  # one forward and one compilation for the two log-softmaxes
        logits = m(f)
        return ordered_log_softmax(logits), jax.nn.log_softmax(logits)

    lp, xla = (np.asarray(x)[len(ids) - 1: -1] for x in both(full))
    np.testing.assert_array_equal(out.logprobs, lp[np.arange(12), out.tokens])
    np.testing.assert_allclose(xla, lp, atol=1e-5, rtol=0)
    batch = stack_samples([{k: np.asarray(v) for k, v in s.items()} for s in _samples("tiny_a", "gen_left_pad")])
    out = g4.generate(m, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
                      temperature=0.0, stop_ids=(), suppress_ids=(), return_logprobs=True)
    row_log_softmax = jax.jit(lambda f, a, p: ordered_log_softmax(m(f, attention_mask=a, positions=p)))
    for b in range(batch["input_ids"].shape[0]):
        mask = np.concatenate([batch["attention_mask"][b], np.ones(8, bool)])
        full = jnp.concatenate([jnp.asarray(batch["input_ids"][b]), jnp.asarray(out.tokens[b])])
        pos = np.where(mask, np.cumsum(mask) - 1, 0)
        lp = np.asarray(row_log_softmax(full, mask, pos))[len(mask) - 9: -1]
        np.testing.assert_array_equal(out.logprobs[b], lp[np.arange(8), out.tokens[b]])


@pytest.mark.machine_code
def test_ordered_log_softmax_does_not_depend_on_the_number_of_rows():
    x = jnp.asarray(5 * np.random.default_rng(0).normal(size=(40, 1000)), jnp.float32)
    whole = np.asarray(jax.jit(ordered_log_softmax)(x))
    rows = np.stack([np.asarray(jax.jit(ordered_log_softmax)(x[i])) for i in (0, 17, 39)])
    np.testing.assert_array_equal(whole[[0, 17, 39]], rows)
    np.testing.assert_allclose(whole, np.asarray(jax.nn.log_softmax(x)), atol=1e-5, rtol=0)


def test_defaults_come_from_the_generation_config():
    m = g4.load(g4.assets.TINY_CHECKPOINT)
    gen = g4.GenerationConfig.from_pretrained(g4.assets.TINY_CHECKPOINT)
    assert gen.stop_ids == (1, 106, 50) and gen.suppress_ids == (1022, 1021) and gen.top_k == 64
    ids = np.arange(3, 15, dtype=np.int32)
    free = np.asarray(g4.generate(m, ids, max_new_tokens=4, temperature=0.0, stop_ids=(), suppress_ids=()))
    # a config that stops at the first greedy token and suppresses nothing
    mine = g4.GenerationConfig(stop_ids=(int(free[0]),), temperature=0.0)
    out = g4.generate(m, ids, max_new_tokens=4, generation_config=mine, return_result=True)
    assert int(out.lengths) == 1 and out.tokens[0] == free[0]
    # do_sample=False is greedy whatever the config's temperature; transformers' names are accepted
    out = g4.generate(m, ids, max_new_tokens=4, generation_config=g4.assets.TINY_CHECKPOINT, do_sample=False,
                      eos_token_id=[], suppress_tokens=[])
    np.testing.assert_array_equal(np.asarray(out), free)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(stop_ids=(5, 99_999)), "stop_ids"),
    (dict(pad_id=-1), "pad_id"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=300_000), "max_position_embeddings"),
    (dict(max_length=3), "max_length"),
])
def test_bad_settings_are_refused_before_tracing(kwargs, match):
    m = model("tiny_c")
    settings = {"temperature": 1.0, "key": jax.random.key(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        g4.generate(m, np.arange(3, 8, dtype=np.int32), **settings)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=4), "num_beams"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(pixel_value=np.zeros((1, 4, 768))), "pixel_values"),
    (dict(images=[1]), "media keywords"),
])
def test_transformers_habits_are_refused_by_name(kwargs, match):
    m = model("tiny_c")
    with pytest.raises(TypeError, match=match):
        g4.generate(m, np.arange(3, 8, dtype=np.int32), temperature=0.0, **kwargs)


def test_harmless_transformers_settings_are_accepted():
    m = model("tiny_c")
    ids = ref.cases("tiny_c")["gen_text"]["input_ids"][0]  # 10 tokens: the programs of the tests above
    a = g4.generate(m, ids, max_new_tokens=3, temperature=0.0, stop_ids=())
    b = g4.generate(m, ids, max_length=13, num_beams=1, repetition_penalty=1.0, do_sample=False, stop_ids=())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padding_without_a_mask_warns_and_right_padding_is_refused():
    m = model("tiny_c")
    padded = np.r_[0, 0, np.arange(3, 11)].astype(np.int32)  # 10 tokens: the programs of the tests above
    with pytest.warns(UserWarning, match="attention_mask"):
        g4.generate(m, padded, max_new_tokens=2, temperature=0.0)
    ids = np.stack([np.r_[0, 0, np.arange(3, 8)], np.arange(3, 10)]).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[0, -2:] = False
    with pytest.raises(ValueError, match="right padding"):
        g4.generate(m, ids, attention_mask=mask, max_new_tokens=2, temperature=0.0)


def test_a_processor_batch_goes_straight_to_generate():
    """`**proc(...)`: input_ids [B, S], attention_mask, mm_token_type_ids and images stacked over the batch."""
    m = g4.load(g4.assets.TINY_CHECKPOINT)
    proc = g4.Processor.from_pretrained(g4.assets.TINY_CHECKPOINT)
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)], [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)]]
    batch = proc(text=["<|image|> what is this?", "a longer prompt first, then <|image|> this"], images=images)
    assert batch["pixel_values"].ndim == 3  # transformers' layout: every image of the batch stacked
    out = g4.generate(m, **batch, max_new_tokens=5, temperature=0.0, stop_ids=())
    assert out.shape == (2, 5)
    stacked = stack_samples(split_batch(dict(batch), m.config))
    ids = stacked.pop("input_ids")
    again = g4.generate(m, ids, max_new_tokens=5, temperature=0.0, stop_ids=(), **stacked)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    for b in range(2):  # each row as its own prompt, without the batch's padding
        keep = batch["attention_mask"][b].astype(bool)
        one = proc(text=[["<|image|> what is this?", "a longer prompt first, then <|image|> this"][b]],
                   images=[images[b]])
        alone = g4.generate(m, **one, max_new_tokens=5, temperature=0.0, stop_ids=())
        assert keep.sum() == one["input_ids"].shape[1]
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(out)[b])
