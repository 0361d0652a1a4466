"""`g4.score`: log-likelihoods of continuations equal the log-softmax of `model(...)` gathered at the targets,
and transformers' on recorded cases (`scripts/record_hf_scores.py` -> `tests/fixtures/hf_scores/`)."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate import scoring
from gemma4_eqx.testing import counting_compilations

import hf_reference as ref

SCORES = ref.HF_DIR.parent / "hf_scores"


@pytest.fixture(scope="module")
def tiny():
    return g4.load(g4.assets.TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def small():
    return g4.load(g4.assets.SMALL_CHECKPOINT)


def _rows(seed, prompt_lengths, cont_lengths, high=1000):
    rng = np.random.default_rng(seed)
    prompts = [np.r_[2, rng.integers(3, high, n - 1)].astype(np.int32) for n in prompt_lengths]
    conts = [rng.integers(3, high, n).astype(np.int32) for n in cont_lengths]
    return prompts, conts


def _reference(model, ids, n_cont, **media):
    """log_softmax(model(ids)) at the continuation's targets (one unpadded row)."""
    logits = eqx.filter_jit(lambda m, ids, media: m(ids, **media))(model, ids, media)
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    rows = np.asarray(logp)[len(ids) - n_cont - 1:len(ids) - 1]
    return np.take_along_axis(rows, ids[len(ids) - n_cont:, None], axis=1)[:, 0]


def _left_padded(rows, width):
    """Rows left-padded to `width` as the scorer pads them: ids, attention mask, positions counting real tokens."""
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, True
    return ids, mask, np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


# ---- against model(...) ---------------------------------------------------------------------------------
def test_equals_log_softmax_of_the_model_fp32(tiny):
    prompts, conts = _rows(0, (6, 18, 41, 4, 10), (4, 1, 7, 2, 5))
    r = g4.score(tiny, prompts, conts)
    assert r.logprobs.shape == (5, 7) and r.logprobs.dtype == np.float32
    assert (r.padded_length == 48).all()  # one group: the longest row (48 tokens) is a multiple of 8
    rows = [np.r_[p, c] for p, c in zip(prompts, conts)]
    ids, mask, positions = _left_padded(rows, 48)
    # the same left-padded rows through model(...), gathered at the targets: only the head's rows differ
    logits = jax.jit(jax.vmap(lambda i, m, p: tiny(i, attention_mask=m, positions=p)))(ids, mask, positions)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i, c in enumerate(conts):
        want = np.take_along_axis(logp[i, 47 - len(c):47], ids[i, 48 - len(c):, None], axis=1)[:, 0]
        assert np.abs(r.logprobs[i, :len(c)] - want).max() <= 1e-5
        assert not r.mask[i, len(c):].any() and (r.logprobs[i, len(c):] == 0).all()
    # unpadded: XLA may pick other kernels for another length (a few 1e-6 here)
    assert np.abs(r.logprobs[2] - _reference(tiny, rows[2], 7)).max() <= 2e-5
    assert np.array_equal(r.count, [4, 1, 7, 2, 5])


def test_equals_log_softmax_of_the_model_fp64_with_an_image_row():
    data = np.load(SCORES / "tiny_a_image.npz")
    with jax.enable_x64(True):
        model = g4.load(ref.checkpoint_dir("tiny_a"), dtype=jnp.float64)
        image_prompt = data["prompt/1"]
        image = {"pixel_values": data["pixel_values"][1:], "image_position_ids": data["image_position_ids"][1:]}
        prompts, conts = _rows(1, (9,), (5,), high=400)
        prompts.append(image_prompt)
        conts.append(data["continuation/1"])
        r = g4.score(model, prompts, conts, pixel_values=[None, image["pixel_values"]],
                     image_position_ids=[None, image["image_position_ids"]])
        assert r.logprobs.dtype == np.float64
        for i, (p, c) in enumerate(zip(prompts, conts)):
            media = image if i == 1 else {}  # a text row and an image row in one group
            want = _reference(model, np.r_[p, c], len(c), **media)
            assert np.abs(r.logprobs[i, :len(c)] - want).max() <= 1e-12


# ---- against transformers ---------------------------------------------------------------------------------
def _case(name):
    data = np.load(SCORES / f"{name}.npz")
    n = len(data["lengths"])
    prompts = [data[f"prompt/{i}"] for i in range(n)]
    conts = [data[f"continuation/{i}"] for i in range(n)]
    media = {k: data[k] for k in ("pixel_values", "image_position_ids") if k in data.files}
    return data, prompts, conts, media


@pytest.mark.parametrize("name", ["small_text", "small_left_pad", "tiny_a_image"])
def test_equals_transformers(name, small):
    data, prompts, conts, media = _case(name)
    meta = json.loads(str(data["meta"]))
    model = small if meta["checkpoint"] == "gemma4_eqx/assets/small" else g4.load(ref.checkpoint_dir("tiny_a"))
    modes = [("intended", "logprobs", "greedy")]
    if "logprobs_hf_forward" in data.files:
        modes.append(("hf_forward", "logprobs_hf_forward", "greedy_hf_forward"))
    for mode, lp_key, greedy_key in modes:
        r = g4.score(model, prompts, conts, mask_mode=mode, **media)
        assert np.array_equal(r.count, data["lengths"])
        assert np.abs(np.where(r.mask, r.logprobs - data[lp_key], 0)).max() <= 1e-4, mode
        assert np.array_equal(r.greedy, data[greedy_key]), mode


def test_media_layouts_agree():
    """transformers' stack over the batch, a per-row stack and a list of per-row arrays give the same scores."""
    data, prompts, conts, media = _case("tiny_a_image")
    model = g4.load(ref.checkpoint_dir("tiny_a"))
    flat = g4.score(model, prompts, conts, **media)
    per_row = g4.score(model, prompts, conts, **{k: v[:, None] for k, v in media.items()})
    listed = g4.score(model, prompts, conts, **{k: [v[:1], v[1:]] for k, v in media.items()})
    assert np.array_equal(flat.logprobs, per_row.logprobs) and np.array_equal(flat.logprobs, listed.logprobs)
    assert (flat.padded_length == 32).all()  # a vision row: the next power of two


# ---- results -------------------------------------------------------------------------------------------
def test_greedy_continuation_is_greedy_and_summaries(small):
    prompt = np.array([2, 818, 597, 623], np.int32)
    # greedy decoding by hand: causal, so the trailing zeros of a fixed 16-token buffer change no earlier logit
    forward = jax.jit(lambda ids: jnp.argmax(small(ids), axis=-1))
    buffer = np.zeros(16, np.int32)
    buffer[:4] = prompt
    for t in range(4, 16):
        buffer[t] = int(forward(buffer)[t - 1])
    new = buffer[4:]
    other = new.copy()
    other[5] = (other[5] + 1) % 1000 + 3
    r = g4.score(small, [prompt, prompt], [new, other])
    assert r.greedy[0].all() and r.is_greedy.tolist() == [True, False] and not r.greedy[1, 5]
    assert np.allclose(r.sum, r.logprobs.sum(-1)) and np.array_equal(r.count, [12, 12])
    assert np.allclose(r.perplexity, np.exp(-r.sum / 12))
    assert np.isclose(r.corpus_perplexity, np.exp(-r.sum.sum() / 24))


# ---- compilation -------------------------------------------------------------------------------------------
def test_five_prompts_in_one_bucket_compile_once(tiny):
    """Rows of 68..128 tokens (text: chunk 64, padded to 128), continuations 1..8 (width 8): one program."""
    prompts, conts = _rows(7, (70, 120, 88, 101, 64), (3, 8, 5, 1, 4))
    before = scoring._score_rows._cache_size()
    with counting_compilations() as first:
        r = g4.score(tiny, prompts[:1], conts[:1])
    with counting_compilations() as rest:
        results = [g4.score(tiny, p, c) for p, c in zip(prompts[1:], conts[1:])]  # one row in, one row out
    assert scoring._score_rows._cache_size() == before + 1
    assert len(first) >= 1 and len(rest) == 0, (len(first), len(rest))
    assert r.padded_length[0] == 128 and all(x.padded_length == 128 for x in results)
    one = results[0]
    assert one.logprobs.shape == (8,) and one.sum.shape == () and one.count == 8
    assert np.isclose(one.perplexity, np.exp(-one.logprobs.sum() / 8), rtol=1e-5)


def test_a_data_set_compiles_once_per_bucket(tiny):
    """8 rows of mixed lengths, 4 per call (rows sorted by length): each group padded to less than twice its
    longest row, one program per group shape, none new for the same rows in another order."""
    lengths = [5, 9, 33, 40, 47, 63, 8, 12]
    prompts, conts = _rows(8, lengths, [1 + i % 6 for i in range(8)])
    before = scoring._score_rows._cache_size()
    r = g4.score(tiny, prompts, conts, batch_size=4)
    total = np.array([len(p) + len(c) for p, c in zip(prompts, conts)])
    groups = np.argsort(total, kind="stable").reshape(2, 4)
    for g in groups:
        assert len(set(r.padded_length[g])) == 1 and total[g].max() <= r.padded_length[g[0]] < 2 * total[g].max()
    assert scoring._score_rows._cache_size() - before == len({int(r.padded_length[g[0]]) for g in groups})
    again = g4.score(tiny, prompts[::-1], conts[::-1], batch_size=4)
    assert scoring._score_rows._cache_size() - before == len({int(r.padded_length[g[0]]) for g in groups})
    assert np.array_equal(again.logprobs[::-1], r.logprobs)


# ---- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, conts, kwargs, error, match", [
    ([[2, 5, 6]], [[]], {}, ValueError, r"continuations\[0\]: empty"),
    ([[]], [[5]], {}, ValueError, r"prompts\[0\]: empty.*<bos>"),
    ([np.array([2.0, 5.0])], [[5]], {}, TypeError, r"prompts\[0\]: expected integer token ids, found dtype float64"),
    ([[2, 5]], [np.array([True])], {}, TypeError, r"continuations\[0\].*dtype bool"),
    ([[2, 5], [2, 6]], [[5]], {}, ValueError, r"2 prompt\(s\) but 1 continuation"),
    ("hello", [5], {}, TypeError, r"prompts: .*tokenize"),
    ([[2, 5]], [[5, 4000]], {}, ValueError, r"continuations\[0\]: token ids must lie in \[0, 1024\)"),
    ([[2, 5]], [[5, 1019]], {}, ValueError, r"continuations\[0\]: holds image / video / audio placeholder"),
    ([[2, 1019, 5]], [[5]], {}, ValueError, r"pixel_values: prompt 0 holds 1 placeholder tokens but its media give 0"),
    ([[2, 5]], [[5]], {"pixel_valeus": np.zeros((1, 4, 6912))}, TypeError, r"did you mean 'pixel_values'"),
    ([[2, 5]], [[5]], {"batch_size": 0}, ValueError, r"batch_size: expected a positive integer"),
    ([[2, 5]], [[5]], {"mask_mode": "causal"}, ValueError, r"mask_mode: expected one of"),
    ([[2, 5], [2, 5]], [[5], [6]], {"pixel_values": [None]}, ValueError,
     r"pixel_values: a list .* one entry per row \(2\)"),
])
def test_bad_input_is_refused_by_name(tiny, prompts, conts, kwargs, error, match):
    with pytest.raises(error, match=match):
        g4.score(tiny, prompts, conts, **kwargs)


def test_media_without_companion_or_wrong_dtype(tiny):
    cfg = tiny.config
    prompt = [2, cfg.boi_token_id, cfg.image_token_id, cfg.eoi_token_id]
    pv = np.zeros((1, 1, cfg.vision.patch_dim), np.float32)
    with pytest.raises(ValueError, match="image_position_ids: row 0 has pixel_values"):
        g4.score(tiny, [prompt], [[5]], pixel_values=[pv])
    with pytest.raises(TypeError, match="image_position_ids: expected integer values, found dtype float32"):
        g4.score(tiny, [prompt], [[5]], pixel_values=[pv], image_position_ids=[np.zeros((1, 1, 2), np.float32)])
