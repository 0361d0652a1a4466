"""g4.surgery: swapping attention (whole runs and arbitrary layers), generation through the KV cache after a
swap, freezing with filter specs, LoRA and its merge, saving what has no checkpoint name."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gemma4_eqx as g4
from gemma4_eqx.testing import WrappedAttention
from gemma4_eqx import surgery
from gemma4_eqx import train
from gemma4_eqx.generate.batching import stack_samples
from gemma4_eqx.io.checkpoint import CheckpointError
from gemma4_eqx.layers.attention import AbstractAttention, Attention
from gemma4_eqx.testing import filled_model

from test_transforms import as_jax, tree_max_diff

# 12 layers = 2 repeats of (5 sliding, 1 full): enough to tell "the same slot of every period" from "one layer".
CONFIG = g4.small_config(vocab_size=256, num_hidden_layers=12, sliding_window=6)


@functools.lru_cache(maxsize=None)
def model():
    """Random weights filled from numpy into an abstract model: nothing is compiled to build it."""

    def draw(name, shape, rng):
        ones = any(k in name for k in ("norm", "ln", "layer_scalar")) and not name.endswith(".bias")
        scale = 1.0 if "embed_tokens" in name else 0.1
        return float(ones) + scale * rng.standard_normal(shape)

    return filled_model(CONFIG, draw)


Wrapped = WrappedAttention  # gemma4_eqx.testing


class NoCache(eqx.Module):
    """Not an AbstractAttention: only __call__."""

    inner: Attention

    def __call__(self, x, positions, mask, band=None):
        return self.inner(x, positions, mask)


IDS = jnp.asarray(np.random.default_rng(1).integers(3, 240, 20), jnp.int32)
logits_of = eqx.filter_jit(lambda m, ids: m(ids))
greedy = functools.partial(g4.generate, max_new_tokens=6, temperature=0.0, stop_ids=())


# ---- swapping attention ----------------------------------------------------------------------------
def test_swapping_the_global_layers_replaces_one_stacked_run_in_place():
    m = model()
    swapped = surgery.replace_attention(m, surgery.LinearAttention)  # layers="full" by default
    stack = swapped.layers
    assert stack.pattern == m.layers.pattern and stack.num_repeats == 2 and stack.cache_slots is None
    assert isinstance(stack.runs[1].self_attn, surgery.LinearAttention)
    assert stack.runs[1].self_attn.feature_map.shape == (2, 1, 1, 32, 32)  # [repeats, run, kv_heads, d, d]
    assert all(a is b for a, b in zip(jax.tree.leaves(stack.runs[0]), jax.tree.leaves(m.layers.runs[0])))
    # the replacement starts from the pretrained projections of each global layer
    for i in (5, 11):
        np.testing.assert_array_equal(stack.layer(i).self_attn.attention.q_proj.weight,
                                      m.layers.layer(i).self_attn.q_proj.weight)


@pytest.mark.parametrize("layers, pattern_lengths, repeats", [
    ("full", (5, 1), 2),
    ([2, 8], (2, 1, 2, 1), 2),  # the same slot in both periods: a run split in three, repeats kept
    ([2], (2, 1, 2, 1, 5, 1), 1),  # one layer: the repeats are unrolled
])
def test_an_identity_replacement_of_any_layers_keeps_logits(layers, pattern_lengths, repeats):
    m = model()
    edited = surgery.replace_attention(m, lambda old, i: Wrapped(old), layers)
    assert tuple(n for _, n in edited.layers.pattern) == pattern_lengths
    assert edited.layers.num_repeats == repeats
    for i in surgery.layer_indices(m, layers):
        assert isinstance(edited.layers.layer(i).self_attn, Wrapped)
    for i in range(12):  # every layer is where it was, with its own weights
        mine, theirs = edited.layers.layer(i), m.layers.layer(i)
        mine = eqx.tree_at(lambda l: l.self_attn, mine, getattr(mine.self_attn, "inner", mine.self_attn))
        assert tree_max_diff(mine, theirs) == 0
    np.testing.assert_allclose(logits_of(edited, IDS), logits_of(m, IDS), atol=2e-5, rtol=1e-5)


def test_decoding_with_the_cache_after_surgery_equals_recomputation():
    """LinearAttention on the global layers (its own with_cache) and a regrouped stack (layer 2 wrapped, so the
    repeats are unrolled and the stock KV-cache layout must be regathered): prefill + decode_step logits equal a
    forward over the whole sequence."""
    swapped = surgery.replace_attention(model(), surgery.LinearAttention, "full")
    edited = surgery.replace_attention(swapped, lambda old, i: Wrapped(old), [2])
    assert edited.layers.cache_slots is not None and edited.layers.num_repeats == 1
    cache = g4.KVCache.init(CONFIG, max_len=IDS.shape[0] + 4, dtype=jnp.float32)
    last, cache = edited.prefill(IDS, cache)
    stepped, tokens = [last], []
    for _ in range(4):
        tokens.append(jnp.argmax(stepped[-1]).astype(jnp.int32))
        logits, cache = edited.decode_step(tokens[-1], cache)
        stepped.append(logits)
    full = logits_of(edited, jnp.concatenate([IDS, jnp.stack(tokens)]))[IDS.shape[0] - 1:]
    np.testing.assert_allclose(jnp.stack(stepped), full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_on_a_regrouped_stack_equals_recomputation_without_a_cache():
    """LinearAttention on the global layers and on the sliding layers 2 and 8 (a run split in three, so the stock
    KV-cache layout is regathered at every step): g4.generate's greedy tokens are those of a loop that runs the
    whole model again for every new token."""
    # Small token embeddings, so the next token depends on the context: with the fixture's scale-1 embeddings,
    # greedy decoding repeats the last prompt token whatever the attention computes.
    quiet = eqx.tree_at(lambda m: m.embed_tokens, model(), model().embed_tokens / 20)
    edited = surgery.replace_attention(quiet, surgery.LinearAttention, [2, 5, 8, 11])
    assert edited.layers.cache_slots is not None and tuple(n for _, n in edited.layers.pattern) == (2, 1, 2, 1)
    steps, n = 8, IDS.shape[0]
    # Multimodal placeholder ids fed back without media are refused by the model, so neither path may pick one.
    placeholders = CONFIG.placeholder_ids
    generated = greedy(edited, IDS, max_new_tokens=steps, suppress_ids=placeholders)
    # The model is causal, so the logits at position t of a fixed-length buffer are those of the sequence up to
    # t: the same recomputation as a growing sequence, with one compilation instead of one per length.
    seq = jnp.concatenate([IDS, jnp.zeros(steps, jnp.int32)])
    for t in range(steps):
        logits = logits_of(edited, seq)[n - 1 + t].at[jnp.asarray(placeholders)].set(-jnp.inf)
        seq = seq.at[n + t].set(jnp.argmax(logits).astype(jnp.int32))
    np.testing.assert_array_equal(generated, seq[n:])
    assert len(set(np.asarray(generated).tolist())) > 1  # the tokens follow the context, not one repeated token


def test_a_replacement_that_is_not_an_attention_is_refused_with_what_to_implement():
    with pytest.raises(TypeError, match=r"layer 5: NoCache is not a g4.layers.attention.AbstractAttention.*with_cache"):
        surgery.replace_attention(model(), lambda old, i: NoCache(old))


class Narrow(AbstractAttention):
    """A broken replacement: returns heads * head_dim / 2 features instead of hidden."""

    inner: Attention

    def __call__(self, x, positions, mask, band=None):
        return self.inner(x, positions, mask)[:, : x.shape[1] // 2]

    def with_cache(self, x, positions, kv, ctx):
        out, kv = self.inner.with_cache(x, positions, kv, ctx)
        return out[:, : x.shape[1] // 2], kv


def test_jaxtyping_names_a_replacement_that_returns_the_wrong_shape():
    """Under the jaxtyping hook the decoder layer's annotations catch it where the output enters the residual."""
    edited = surgery.replace_attention(model(), lambda old: Narrow(old), layers="full")
    with pytest.raises(Exception, match="feed_forward|hidden"):
        edited(IDS)


def test_replacements_that_cannot_be_stacked_are_named():
    def make(old, i):  # a different feature-map size in one layer
        lin = surgery.LinearAttention(old)
        return lin if i == 5 else eqx.tree_at(lambda l: l.feature_map, lin, lin.feature_map[..., :8])

    with pytest.raises(ValueError, match="replacements of layers \\[5, 11\\]: item 1"):
        surgery.replace_attention(model(), make)


def test_a_swapped_model_vmaps():
    swapped = surgery.replace_attention(model(), surgery.LinearAttention)
    samples = [{"input_ids": np.asarray(IDS)}, {"input_ids": np.asarray(IDS[::-1])}]
    batched = eqx.filter_jit(jax.vmap(lambda m, s: m(**s), in_axes=(None, 0)))(swapped, as_jax(stack_samples(samples)))
    for b, s in enumerate(samples):
        np.testing.assert_allclose(batched[b], logits_of(swapped, s["input_ids"]), atol=2e-5, rtol=1e-5)


def test_a_swapped_model_saves_and_loads_through_surgery_save(tmp_path):
    swapped = surgery.replace_attention(model(), surgery.LinearAttention)
    swapped = eqx.tree_at(lambda m: m.layers.runs[1].self_attn.feature_map, swapped,
                          swapped.layers.runs[1].self_attn.feature_map * 1.5)  # a trained-looking map
    surgery.save(swapped, tmp_path)
    loaded = surgery.load(tmp_path, lambda m: surgery.replace_attention(m, surgery.LinearAttention))
    assert tree_max_diff(loaded, swapped) == 0
    assert jax.tree.structure(loaded) == jax.tree.structure(swapped)
    with pytest.raises(ValueError, match="feature_map"):  # a skeleton that does not match the file is named
        surgery.load(tmp_path, lambda m: surgery.replace_attention(
            m, lambda old: eqx.tree_at(lambda l: l.feature_map, surgery.LinearAttention(old),
                                       jnp.zeros((1, 32, 16)))))


@pytest.mark.parametrize("layers, named", [
    ("full", r"layers\.5\.self_attn \(model\.layers\.runs\[1\]\.self_attn, layers \[5, 11\]\)"),
    ([2], r"layers\.2\.self_attn \(model\.layers\.runs\[1\]\.self_attn, layers \[2\]\)"),  # regrouped
])
def test_g4_save_names_the_swapped_attention_it_cannot_write(layers, named, tmp_path):
    """transformers' names exist only for the stock modules; writing the rest would drop parameters silently."""
    swapped = surgery.replace_attention(model(), surgery.LinearAttention, layers)
    with pytest.raises(CheckpointError, match=named + r": expected a standard Gemma 4 attention layer "
                                                       r".*found LinearAttention.*g4\.surgery\.save"):
        g4.save(swapped, tmp_path)


# ---- freezing ---------------------------------------------------------------------------------------
def _changed(a, b):
    return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)


def _marked(spec):
    return {jax.tree_util.keystr(p) for p, keep in jax.tree_util.tree_leaves_with_path(spec) if keep}


def test_filter_specs_select_exactly_the_named_parts():
    m = model()
    assert _marked(surgery.only_full_attention(m)) == {
        ".layers.runs[1].self_attn." + s for s in ("q_proj.weight", "k_proj.weight", "o_proj.weight",
                                                   "q_norm.weight", "k_norm.weight")}
    assert all(k.startswith((".embed_vision", ".embed_audio")) for k in _marked(surgery.only_embedders(m)))
    assert ".embed_tokens" in _marked(surgery.only_embedders(m, tokens=True))
    both = surgery.union(surgery.only_full_attention(m), surgery.only_embedders(m))
    assert _marked(both) == _marked(surgery.only_full_attention(m)) | _marked(surgery.only_embedders(m))
    swapped = surgery.replace_attention(m, surgery.LinearAttention)
    assert ".layers.runs[1].self_attn.feature_map" in _marked(surgery.only_full_attention(swapped))


def test_a_filter_spec_cannot_split_a_stacked_run():
    with pytest.raises(ValueError, match=r"layers: \[2\] share stacked arrays"):
        surgery.only_attention(model(), [2])


# ---- LoRA -------------------------------------------------------------------------------------------
def _with_random_adapters(m, seed):
    """LoRA with non-zero B (as after training), so the adapters change the output."""
    is_lora = lambda x: isinstance(x, surgery.LoRALinear)
    loras = [x for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x)]
    rng = np.random.default_rng(seed)
    new_b = [jnp.asarray(0.05 * rng.standard_normal(x.lora_b.shape), x.lora_b.dtype) for x in loras]
    return eqx.tree_at(lambda m: [x.lora_b for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x)], m, new_b)


ALL_PROJECTIONS = surgery.ATTENTION_PROJECTIONS + surgery.MLP_PROJECTIONS


@pytest.mark.parametrize("layers, targets", [("all", ALL_PROJECTIONS), ([3], ("q_proj", "v_proj"))])
def test_merged_adapters_give_the_same_logits(layers, targets, tmp_path):
    m = model()
    adapted = surgery.add_lora(m, key=jax.random.key(1), rank=4, alpha=8.0, targets=targets, layers=layers)
    # B = 0: the identity at first (a regrouped stack may fuse differently: rounding only)
    np.testing.assert_allclose(logits_of(adapted, IDS), logits_of(m, IDS), atol=2e-5, rtol=1e-5)
    if layers == "all":
        assert isinstance(adapted.layers.runs[0].self_attn.v_proj, surgery.LoRALinear)
        assert adapted.layers.runs[1].self_attn.v_proj is None  # keys are values on the global layers: skipped
        assert adapted.layers.runs[0].mlp.down_proj.lora_a.shape == (2, 5, CONFIG.text.intermediate_size, 4)
    adapted = _with_random_adapters(adapted, 2)
    merged = surgery.merge_lora(adapted)
    assert not any(isinstance(x, surgery.LoRALinear) for x in jax.tree.leaves(
        merged, is_leaf=lambda x: isinstance(x, surgery.LoRALinear)))
    with_adapters, folded = logits_of(adapted, IDS), logits_of(merged, IDS)
    assert float(jnp.abs(with_adapters - logits_of(m, IDS)).max()) > 1e-2  # the adapters do something
    np.testing.assert_allclose(folded, with_adapters, atol=5e-5, rtol=1e-5)
    if layers != "all":
        return
    # the merged model is stock again: transformers' names, g4.save / g4.load
    g4.save(merged, tmp_path)
    np.testing.assert_allclose(logits_of(g4.load(tmp_path), IDS), folded, atol=2e-5, rtol=1e-5)


def test_g4_save_asks_for_merge_lora_first(tmp_path):
    """Saving after merge_lora works (test_merged_adapters_give_the_same_logits); before, the wrapped projection
    is named."""
    adapted = surgery.add_lora(model(), key=jax.random.key(0))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj .*expected a plain Linear, found "
                                              r"LoRALinear.*merge_lora"):
        g4.save(adapted, tmp_path)


def test_a_swapped_model_grads_and_trains_only_the_selected_arrays():
    """LinearAttention on the global layers plus LoRA on the sliding layers; train the swapped attention and the
    adapters: every selected array moves (it has a gradient), nothing else does."""
    swapped = surgery.replace_attention(model(), surgery.LinearAttention)
    adapted = surgery.add_lora(swapped, key=jax.random.key(0), rank=2, layers="sliding")
    only_lora = surgery.only_lora(adapted)
    assert _marked(only_lora) and all(k.endswith((".lora_a", ".lora_b")) for k in _marked(only_lora))
    spec = surgery.union(surgery.only_full_attention(adapted), only_lora)
    optimizer = optax.sgd(1e-2)
    step = train.make_train_step(optimizer, spec, donate=False)
    new, _, loss = step(adapted, train.init_optimizer(optimizer, adapted, spec),
                        as_jax(stack_samples([{"input_ids": np.asarray(IDS)}])))
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new))
    changed = _marked(_changed(new, adapted))
    # lora_a has no gradient while lora_b is still zero (d loss / dA = x^T g B^T), so the first step moves only B
    assert changed == {k for k in _marked(spec) if not k.endswith(".lora_a")}
    assert ".layers.runs[1].self_attn.feature_map" in changed


def test_lora_targets_are_checked():
    with pytest.raises(ValueError, match="qproj"):
        surgery.add_lora(model(), key=jax.random.key(0), targets=("qproj",))
