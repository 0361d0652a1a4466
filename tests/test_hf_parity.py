"""Logits against transformers' recorded outputs (scripts/record_hf_reference.py), on valid positions.

fp32: max |diff| <= 1e-4. bf16 (weights and activations): same argmax everywhere and |diff| <= 0.25 with
`numerics="torch_cpu"` (in fact bit-identical); the default XLA numerics are held to a statistical bound.
Multimodal cases in both mask modes: `hf_forward` against transformers' bare forward(), `intended` against the
class-level static-cache masks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.batching import split_batch, stack_samples

import hf_reference as ref

FP32_TOL = 1e-4
BF16_TOL = 0.25


@functools.lru_cache(maxsize=None)
def model(name: str, dtype_name: str):
    return g4.load(ref.checkpoint_dir(name), dtype=jnp.dtype(dtype_name))


@functools.partial(jax.jit, static_argnames=("mask_modes",))
def batched_logits(m, batch, mask_modes=("intended",)):
    """{mask mode: logits of every row}. Several modes go in one program, which compiles faster than one program
    per mode: XLA computes what the modes share (the media encoders; without vision blocks, everything) once."""
    return {mode: jax.vmap(lambda b: m(**b, mask_mode=mode))(batch) for mode in mask_modes}


def batch_of(m, case: dict) -> dict:
    inputs = {k: v for k, v in ref.inputs(case).items() if k != "num_frames_per_video"}
    return stack_samples(split_batch(inputs, m.config))


def run(name: str, case: dict, dtype_name: str) -> np.ndarray:
    m = model(name, dtype_name)
    return np.asarray(batched_logits(m, batch_of(m, case))["intended"]).astype(np.float32)


MASK_MODES = ("hf_forward", "intended")


@functools.lru_cache(maxsize=None)
def multimodal_logits(name: str, case_name: str) -> dict[str, np.ndarray]:
    """fp32 logits of a multimodal case in both mask modes (one program for both; each mode's test reads its own)."""
    m = model(name, "float32")
    out = batched_logits(m, batch_of(m, ref.cases(name)[case_name]), mask_modes=MASK_MODES)
    return {mode: np.asarray(logits) for mode, logits in out.items()}


def valid(case):
    return case["attention_mask"].astype(bool) if "attention_mask" in case else np.ones(case["input_ids"].shape, bool)


def test_reference_fixtures_exist():
    assert len(ref.checkpoints()) >= 3, "run scripts/record_hf_reference.py (see tests/fixtures/hf/README.md)"


TEXT_CASES = [(n, c) for n, c in ref.case_ids(("logits",)) if not c.endswith("_bf16")]
BF16_CASES = [(n, c) for n, c in ref.case_ids(("logits",)) if c.endswith("_bf16")]
MM_CASES = ref.case_ids(("logits_hf_forward", "logits_intended"))


@pytest.mark.parametrize("name, case_name", TEXT_CASES)
def test_fp32_logits_match_transformers(name, case_name):
    case = ref.cases(name)[case_name]
    ours = run(name, case, "float32")
    v = valid(case)
    diff = np.abs(ours - case["logits"])[v]
    assert diff.max() <= FP32_TOL, f"max |diff| {diff.max():.3g}"


@pytest.mark.parametrize("name, case_name", BF16_CASES)
def test_bf16_logits_agree_with_transformers(name, case_name):
    """bf16 weights and activations, against transformers' own bf16 run of the same inputs.

    Measured on these checkpoints: every decoder layer reproduces transformers' bf16 output bit for bit except
    for rare 1-ulp flips from fp32 reduction order (RMSNorm means, matmul accumulation); through 6-12 layers such
    a flip can grow to ~0.5 at the logits, the same size as transformers' own bf16-vs-fp32 error here. So the
    test asks: (1) we are at least as close to the fp32 reference as transformers' bf16 is (x1.25), (2) within
    0.25 of transformers' bf16 on >= 97% of valid logits and the same argmax wherever transformers' bf16 top-2
    margin exceeds its own bf16 error.

    tests/test_bf16_modules.py shows where the differences come from: fed transformers' own bf16 inputs, every
    projection, RoPE, the attention core and the MLP reproduce its outputs bit for bit; the only differences are
    rare 1-ulp flips in RMSNorm outputs (XLA and torch sum the fp32 mean of squares in different orders) and
    in GELU-tanh where `1 + tanh` cancels (XLA's and torch's fp32 tanh differ in the last bit). With the default
    numerics the literal "0.25 and argmax everywhere" holds on 4 of the 6 cases (2 of them exactly equal);
    reproducing torch's reduction order and GELU rounding (`numerics="torch_cpu"`, next test) makes all 6 exact.
    """
    case = ref.cases(name)[case_name]
    fp32_case = ref.cases(name)[case_name.removesuffix("_bf16")]
    assert np.array_equal(fp32_case["input_ids"], case["input_ids"])
    ours = run(name, case, "bfloat16")
    v = valid(case)
    theirs, exact = case["logits"], fp32_case["logits"]
    assert_bf16_agrees(ours, theirs, exact, v)


def assert_bf16_agrees(ours, theirs, exact, v):
    """At least as close to fp32 as transformers' bf16 (x1.25), within BF16_TOL of it on >= 97% of the valid
    logits, and the same argmax wherever its top-2 margin exceeds its own bf16 error."""
    their_error = np.abs(theirs - exact)[v].max()
    assert np.abs(ours - exact)[v].max() <= 1.25 * their_error
    close = np.abs(ours - theirs)[v] <= BF16_TOL
    assert close.mean() >= 0.97, f"only {close.mean():.3f} of logits within {BF16_TOL}"
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    decided = v & (top2[..., 1] - top2[..., 0] > their_error)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    assert agree[decided].all(), f"argmax differs at {np.argwhere(~agree & decided)[:5].tolist()}"


@functools.lru_cache(maxsize=None)
def torch_cpu_model(name: str):
    return g4.load(ref.checkpoint_dir(name), dtype=jnp.bfloat16, numerics="torch_cpu")


@pytest.mark.machine_code
@pytest.mark.parametrize("name, case_name", BF16_CASES)
def test_bf16_logits_equal_transformers_with_torch_cpu_numerics(name, case_name):
    """The issue's literal bf16 criterion (same argmax everywhere, within 0.25), met by being bit-identical.

    `numerics="torch_cpu"` sums each RMSNorm in torch's CPU order and rounds the GELU as torch's kernel does
    (gemma4_eqx/layers/numerics.py); conftest sets `--xla_allow_excess_precision=false` so XLA rounds after every
    bf16 operation as torch does. Everything else (projections, RoPE, attention, residuals) already rounds where
    transformers rounds, so the bf16 logits equal transformers' bf16 logits exactly (measured: all 6 cases).
    """
    case = ref.cases(name)[case_name]
    m = torch_cpu_model(name)
    ours = np.asarray(batched_logits(m, batch_of(m, case))["intended"]).astype(np.float32)
    v = valid(case)
    theirs = case["logits"]
    if ref.bf16_order_differs():
        # XLA's bf16 products add in another order on this CPU than on the recording machine
        # (hf_reference.bf16_order_differs): held to the default-numerics criterion instead
        assert_bf16_agrees(ours, theirs, ref.cases(name)[case_name.removesuffix("_bf16")]["logits"], v)
        return
    assert (ours.argmax(-1) == theirs.argmax(-1))[v].all()
    assert np.abs(ours - theirs)[v].max() <= BF16_TOL
    assert np.array_equal(ours[v], theirs[v]), (f"{(ours[v] != theirs[v]).sum()} logits differ, "
                                                f"max {np.abs(ours - theirs)[v].max():.3g}")


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("name, case_name", MM_CASES)
def test_multimodal_logits_match_transformers(name, case_name, mode):
    case = ref.cases(name)[case_name]
    key = f"logits_{mode}"
    if key not in case:
        pytest.skip(f"{case_name} has no {key}")
    ours = multimodal_logits(name, case_name)[mode]
    diff = np.abs(ours - case[key])[valid(case)]
    assert diff.max() <= FP32_TOL, f"max |diff| {diff.max():.3g}"
