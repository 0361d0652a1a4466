"""Modes as modules: policies compose with surgery (LoRA, a swapped attention, a regrouped stack), the cache rolls
back (`KVCache.truncate`, ring buffer included), and one scan driver serves the forward and the cached path."""

import ast
import functools
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.testing import WrappedAttention
from gemma4_eqx import surgery
from gemma4_eqx.generate.batching import split_batch
from gemma4_eqx.layers import policy
from gemma4_eqx.layers.decoder import DecoderStack
from gemma4_eqx.testing import counting_compilations

import hf_reference as ref

PROMPT = 30  # tiny_a's window is 8: the ring wraps during the prompt and again while decoding
STEPS = 6


@functools.lru_cache(maxsize=None)
def base():
    return g4.load(ref.checkpoint_dir("tiny_a"))


Wrapped = WrappedAttention  # gemma4_eqx.testing


def _lora(m):
    edited = surgery.add_lora(m, key=jax.random.key(1), rank=2, targets=("q_proj", "up_proj"))
    # lora_b starts at zero (an unchanged model); give the adapters something to compute
    return eqx.tree_at(lambda t: [x.lora_b for x in jax.tree.leaves(t, is_leaf=_is_lora) if _is_lora(x)], edited,
                       replace_fn=lambda b: 0.05 * jnp.ones_like(b))


def _is_lora(x):
    return isinstance(x, surgery.LoRALinear)


EDITS = {
    "lora": _lora,
    "linear_attention": lambda m: surgery.replace_attention(m, surgery.LinearAttention, "full"),
    "regrouped": lambda m: surgery.replace_attention(m, lambda old, i: Wrapped(old), [2]),
}


@functools.lru_cache(maxsize=None)
def edited(name):
    return EDITS[name](base())


def _ids(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 400, n), jnp.int32)


def _cached_logits(m, ids, prompt, *, spare=0):
    """Prefill `ids[:prompt]`, then decode the rest one token at a time; the logits that predict each next token."""
    cache = g4.KVCache.init(m.config, max_len=ids.shape[0], dtype=m.dtype, spare=spare)
    logits, cache = m.prefill(ids[:prompt], cache)
    out = [logits]
    for t in range(prompt, ids.shape[0] - 1):
        logits, cache = m.decode_step(ids[t], cache)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out])


forward = eqx.filter_jit(lambda m, ids: m(ids))

CPU_MODES = [(numerics, kernel) for numerics in ("xla", "torch_cpu") for kernel in ("xla", "auto")]


@eqx.filter_jit
def _logits_in_every_cpu_mode(m, ids):
    """(logits of `m`, {(numerics, kernel): logits of `m` switched to that mode}) from one program: a mode is a
    static field over the same arrays, so XLA compiles what the modes compute alike once, not once per mode."""
    return m(ids), {mode: m.with_numerics(mode[0]).with_attention_implementation(mode[1])(ids) for mode in CPU_MODES}


# ---- policies compose with surgery --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EDITS))
def test_an_edited_model_switches_to_every_cpu_mode(name):
    """Every numerics mode and every kernel that runs on CPU: same function as the default (within fp32 rounding)."""
    m = edited(name)
    ids = _ids(24)
    reference, logits = _logits_in_every_cpu_mode(m, ids)
    for numerics, kernel in CPU_MODES:
        switched = m.with_numerics(numerics).with_attention_implementation(kernel)
        assert policy.policies(switched, policy.Numerics) == {policy.as_numerics(numerics)}
        assert policy.policies(switched, policy.AttentionKernel) == {policy.as_kernel(kernel)}
        np.testing.assert_allclose(np.asarray(logits[numerics, kernel]), np.asarray(reference), atol=2e-4, rtol=1e-4)


@pytest.mark.machine_code
@pytest.mark.parametrize("name", ["lora", "regrouped"])
def test_under_invariant_numerics_an_edited_models_cached_decode_equals_its_forward_bit_for_bit(name):
    m = edited(name).with_numerics("invariant")
    ids = _ids(PROMPT + STEPS)
    stepped = _cached_logits(m, ids, PROMPT)
    full = np.asarray(forward(m, ids))[PROMPT - 1:-1]
    assert np.array_equal(stepped, full), f"max diff {np.abs(stepped - full).max()}"


def test_a_module_that_cannot_honour_invariant_numerics_is_named():
    with pytest.raises(g4.PolicyError, match=r"layers\.runs\[1\]\.self_attn \(LinearAttention\) cannot run under "
                                             r"Numerics 'invariant'"):
        edited("linear_attention").with_numerics("invariant")
    # and the kernel refusal names the attention module that holds both policies
    with pytest.raises(g4.PolicyError, match=r"\(Attention\) cannot run under AttentionKernel 'cudnn'"):
        base().with_numerics("invariant").with_attention_implementation("cudnn")


def test_policies_are_fields_not_leaves_and_nothing_is_mutated():
    m = base()
    switched = g4.with_policy(m, g4.Invariant())
    assert all(a is b for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(switched)))
    assert policy.policies(m, policy.Numerics) == {g4.XLA()}
    assert policy.policies(switched, policy.Numerics) == {g4.Invariant()}
    remat = g4.with_policy(m, g4.Remat(enabled=True, policy="dots_saveable"))
    assert remat.layers.remat.name == "dots_saveable" and not m.layers.remat
    # no module in the package copies modules or sets attributes on a built one (frozen config dataclasses set
    # their own fields in __post_init__)
    for path, source in _package_sources():
        if path.parent.name != "config":  # the frozen config dataclasses normalise their fields
            assert "object.__setattr__" not in source, path
        assert "copy.copy(" not in source, path


def test_no_class_subclasses_the_decoder_stack():
    def subclasses(cls):
        return set(cls.__subclasses__()).union(*(subclasses(c) for c in cls.__subclasses__()))

    assert not subclasses(DecoderStack)


def _package_sources():
    root = pathlib.Path(g4.__file__).parent
    return [(p, p.read_text()) for p in sorted(root.rglob("*.py"))]


def test_one_function_scans_the_layers():
    """`lax.scan` over the layer runs appears in one function of the package: decoder.scan_layers."""
    users = []
    for path, source in _package_sources():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                body = ast.get_source_segment(source, node)
                if "lax.scan(" in body and ".runs" in body:
                    users.append(f"{path.name}:{node.name}")
    assert users == ["decoder.py:scan_layers"]


# ---- truncate -----------------------------------------------------------------------------------------------------
@pytest.mark.machine_code
def test_truncate_rolls_a_wrapped_ring_back_exactly():
    """Decode past the end, roll back k tokens (the ring has wrapped several times), decode other tokens: the
    logits equal a cache that never saw the discarded ones, bit for bit under invariant numerics."""
    m = base().with_numerics("invariant")
    spare, k = 3, 4  # k = spare + 1 tokens can be rolled back
    ids = _ids(PROMPT + STEPS)
    other = _ids(k, seed=5)
    cache = g4.KVCache.init(m.config, max_len=PROMPT + STEPS + k, dtype=m.dtype, spare=spare)
    assert cache.ring_size == m.config.text.sliding_window + spare and cache.spare == spare
    _, cache = m.prefill(ids[:PROMPT], cache)
    for t in range(PROMPT, PROMPT + STEPS):
        _, cache = m.decode_step(ids[t], cache)
    snapshot = cache
    cache = cache.truncate(PROMPT + STEPS - k)
    assert int(cache.length) == PROMPT + STEPS - k and int(cache.next_position) == PROMPT + STEPS - k
    rolled, tokens = [], [other[t] for t in range(k)]  # (indexing compiles too: outside the count)
    with counting_compilations() as compiled:  # the rolled-back cache reuses the decode step's program
        for token in tokens:
            logits, cache = m.decode_step(token, cache)
            rolled.append(np.asarray(logits))
    assert compiled == [], f"{len(compiled)} compilations after truncate"
    fresh_ids = jnp.concatenate([ids[:PROMPT + STEPS - k], other])
    full = np.asarray(forward(m, fresh_ids))[PROMPT + STEPS - k:]
    assert np.array_equal(np.stack(rolled), full)
    # the snapshot was not donated: it still decodes
    logits, _ = m.decode_step(ids[0], snapshot)
    assert np.isfinite(np.asarray(logits)).all()


def test_truncate_refuses_to_lose_window_keys():
    m = base()
    cache = g4.KVCache.init(m.config, max_len=PROMPT + 8, dtype=m.dtype, spare=1)
    _, cache = m.prefill(_ids(PROMPT), cache)
    cache.truncate(PROMPT - 2)  # spare + 1
    with pytest.raises(ValueError, match=r"rolling back from 30 to 27 slots loses sliding-window keys.*spare=2"):
        cache.truncate(PROMPT - 3)
    with pytest.raises(ValueError, match=r"length: expected 0 <= length <= 30"):
        cache.truncate(PROMPT + 1)
    with pytest.raises(Exception, match="rolling back more tokens than the ring keeps"):
        jax.block_until_ready(eqx.filter_jit(lambda c, n: c.truncate(n))(cache, jnp.int32(PROMPT - 3)))
    # a context that still fits the ring can roll back to the start
    short = g4.KVCache.init(m.config, max_len=8, dtype=m.dtype)
    _, short = m.prefill(_ids(5), short)
    assert int(short.truncate(0).length) == 0


def test_truncate_over_a_batch_is_vmapped():
    m = base()
    cache = g4.KVCache.init(m.config, max_len=20, dtype=m.dtype, batch=2, spare=2)
    # jitted (the model an argument): one program each, where the eager vmap compiled one per primitive
    prefill = eqx.filter_jit(jax.vmap(lambda m, ids, c: g4.decode.prefill(m, ids, c), in_axes=(None, 0, 0)))
    _, cache = prefill(m, jnp.stack([_ids(12), _ids(12, 1)]), cache)
    rolled = eqx.filter_jit(jax.vmap(lambda c: c.truncate(10)))(cache)
    assert np.asarray(rolled.length).tolist() == [10, 10]
    assert not np.asarray(rolled.full_valid)[:, 10:].any()


# ---- media --------------------------------------------------------------------------------------------------------
def test_a_misspelled_media_keyword_is_named_with_the_closest_name():
    m = base()
    with pytest.raises(TypeError, match=r"pixel_value: not a media keyword; did you mean 'pixel_values'"):
        m(_ids(5), pixel_value=np.zeros((1, 4, m.config.vision.patch_dim), np.float32))
    with pytest.raises(ValueError, match="image_position_ids: required with pixel_values"):
        g4.Media.of(pixel_values=np.zeros((1, 4, 12), np.float32))


def test_placeholders_without_media_and_out_of_range_ids_are_refused():
    m = base()
    ids = _ids(6).at[2].set(m.config.image_token_id)
    with pytest.raises(ValueError, match="pixel_values: input_ids hold images placeholder tokens but no media"):
        m(ids)
    with pytest.raises(ValueError, match=r"input_ids: token ids must lie in \[0, 512\)"):
        m(_ids(6).at[0].set(512))
    with pytest.raises(Exception, match=r"token ids must lie in \[0, 512\)"):
        jax.block_until_ready(forward(m, _ids(6).at[0].set(-1)))


def test_mm_token_type_ids_follow_from_the_ids_when_omitted():
    """A mixed image/audio/video prompt without mm_token_type_ids gets the same logits as with the processor's."""
    m = base()
    for sample in split_batch({k: v for k, v in ref.inputs(ref.cases("tiny_a")["mm_mixed"]).items()
                               if k != "num_frames_per_video"}, m.config):
        sample = {k: jnp.asarray(v) for k, v in sample.items()}
        assert "mm_token_type_ids" in sample and "pixel_values" in sample
        with_types, without_types = _with_and_without_types(m, sample)
        np.testing.assert_array_equal(np.asarray(without_types), np.asarray(with_types))
        sample.pop("mm_token_type_ids")
        wrong = dict(sample, mm_token_type_ids=jnp.zeros_like(sample["input_ids"]))
        with pytest.raises(ValueError, match="mm_token_type_ids: disagree with input_ids"):
            m(**wrong)


@eqx.filter_jit
def _with_and_without_types(m, sample):
    """Logits with the given mm_token_type_ids and with them omitted; one program, so the media encoders (the same
    computation in both) compile once."""
    without = {k: v for k, v in sample.items() if k != "mm_token_type_ids"}
    return m(**sample), m(**without)
