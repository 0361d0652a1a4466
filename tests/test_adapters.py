"""LoRA adapters as files in PEFT's format (`g4.save_adapters` / `g4.load_adapters`, `gemma4_eqx.io.adapters`).

References: `tests/fixtures/peft/` (scripts/record_peft_adapter.py: two adapters PEFT 0.21.2 wrote for transformers'
model of `assets/small`, with transformers + PEFT's fp32 logits) and, for the other direction, PEFT itself loading
an adapter written here (`scripts/peft_oracle.py` in `.venv-hf`, one subprocess for this module; skipped without
that venv or without peft in it, except under CI, where it fails).

Every forward goes through one jitted program per model structure: the three prompts are padded with a token at
the end to one length (causal attention: a position never sees the ones after it) and vmapped.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.assets import SMALL_CHECKPOINT
from gemma4_eqx.io import adapters
from gemma4_eqx.io.safetensors import SafetensorsFile, write_file
from gemma4_eqx import surgery

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "peft"
CANDIDATES = (ROOT / ".venv-hf", pathlib.Path("/work/venv-hf"))
CASES = np.load(FIXTURES / "cases.npz")
IDS = [CASES[f"ids/{i}"] for i in range(3)]
LENGTH = max(len(x) for x in IDS)
PADDED = np.stack([np.concatenate([x, np.full(LENGTH - len(x), 3, np.int32)]) for x in IDS])
TOL = 1e-5  # fp32, ours vs transformers + PEFT

_forward = eqx.filter_jit(lambda m, ids: jax.vmap(m)(ids))


def logits(model) -> list[np.ndarray]:
    out = np.asarray(_forward(model, PADDED))
    return [out[i, :len(x)] for i, x in enumerate(IDS)]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def base():
    return g4.load(SMALL_CHECKPOINT)


@pytest.fixture(scope="module")
def loaded(base):
    return {name: g4.load_adapters(base, FIXTURES / name) for name in ("adapter", "adapter_patterns")}


def is_lora(x) -> bool:
    return isinstance(x, surgery.LoRALinear)


def with_random_b(model, seed: int):
    """Non-zero B on every uniform-form adapter (as after training)."""
    get = lambda m: [x.lora_b for x in jax.tree.leaves(m, is_leaf=is_lora) if is_lora(x) and x.lora_scale is None]
    rng = np.random.default_rng(seed)
    return eqx.tree_at(get, model, [jnp.asarray(0.05 * rng.standard_normal(b.shape), b.dtype) for b in get(model)])


# ---- PEFT's files load here ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adapter", "adapter_patterns"])
def test_peft_adapters_give_transformers_peft_logits(loaded, name):
    d = max_diff(logits(loaded[name]), [CASES[f"{name}/{i}"] for i in range(3)])
    assert d < TOL, d


def test_the_stack_keeps_its_runs_with_padded_ranks_and_per_layer_scales(base, loaded):
    """rank 8 / alpha 16 everywhere: add_lora's uniform form. The patterns adapter (layers 0, 3, 5; o_proj rank 4;
    rslora; layer 5's q_proj alpha 32) in the same two runs: per-layer scales, zero-padded ranks, layers 1, 2, 4
    without adapters."""
    plain, patterns = loaded["adapter"], loaded["adapter_patterns"]
    assert plain.layers.pattern == patterns.layers.pattern == base.layers.pattern
    assert plain.layers.cache_slots is patterns.layers.cache_slots is None
    q = plain.layers.runs[0].self_attn.q_proj
    assert q.lora_scale is None and q.scale == 2.0 and q.lora_a.shape == (1, 5, 128, 8)
    assert plain.layers.runs[1].self_attn.v_proj is None  # keys are values: k_proj's adapter adapts them
    o = patterns.layers.runs[0].self_attn.o_proj
    assert o.lora_a.shape == (1, 5, 128, 4)
    np.testing.assert_array_equal(o.lora_rank, [[4, 0, 0, 4, 0]])
    np.testing.assert_array_equal(o.lora_scale, [[8.0, 0, 0, 8.0, 0]])  # 16 / sqrt(4)
    q = patterns.layers.runs[0].self_attn.q_proj
    np.testing.assert_array_equal(q.lora_scale, np.float32([[16 / 8**0.5, 0, 0, 16 / 8**0.5, 0]]))
    assert not np.any(np.asarray(q.lora_a)[0, [1, 2, 4]]) and not np.any(np.asarray(q.lora_b)[0, [1, 2, 4]])
    full_q = patterns.layers.runs[1].self_attn.q_proj  # one layer: the uniform form, PEFT's scaling as a float
    assert full_q.lora_scale is None and full_q.scale == 32 / 8**0.5


def test_merging_the_per_layer_form_gives_transformers_peft_logits(loaded):
    merged = surgery.merge_lora(loaded["adapter_patterns"])
    assert not any(is_lora(x) for x in jax.tree.leaves(merged, is_leaf=is_lora))
    d = max_diff(logits(merged), [CASES[f"adapter_patterns/{i}"] for i in range(3)])
    assert d < TOL, d


@pytest.fixture(scope="module")
def mixed(base, loaded):
    """The patterns adapter with layer 3's q_proj cut to rank 5: padded to the run's 8 (attach_lora directly)."""
    weights = surgery.lora_weights(loaded["adapter_patterns"])
    w = weights[3, "q_proj"]
    weights[3, "q_proj"] = surgery.LoRAWeights(w.a[:, :5], w.b[:5], w.scale)
    model = surgery.attach_lora(base, weights)
    np.testing.assert_array_equal(model.layers.runs[0].self_attn.q_proj.lora_rank, [[8, 0, 0, 5, 0]])
    assert surgery.lora_weights(model)[3, "q_proj"].rank == 5
    return model


def test_padding_and_layers_without_adapters_get_no_gradient(mixed):
    """Training keeps the per-layer form exact: the padded ranks and the layers without an adapter have exactly
    zero gradient (so SGD and Adam leave them at zero), the adapters themselves do not."""
    params, rest = eqx.partition(mixed, surgery.only_lora(mixed))
    grads = jax.grad(lambda p: jnp.sum(jax.vmap(eqx.combine(p, rest))(PADDED[:1]) ** 2) * 1e-6)(params)
    q = grads.layers.runs[0].self_attn.q_proj
    ga, gb = np.asarray(q.lora_a)[0], np.asarray(q.lora_b)[0]  # [5 layers, in, 8], [5 layers, 8, out]
    assert np.all(np.any(ga[[0, 3], :, :5], axis=1)) and np.all(np.any(gb[[0, 3], :5], axis=2))
    assert not np.any(ga[3, :, 5:]) and not np.any(gb[3, 5:])
    assert not np.any(ga[[1, 2, 4]]) and not np.any(gb[[1, 2, 4]])


# ---- ours: save -> load, size ---------------------------------------------------------------------
def test_save_then_load_onto_a_fresh_base_is_bit_exact(loaded, mixed, base, tmp_path):
    """Both forms: add_lora's (trained-looking B) on q/k/v/o, the PEFT-loaded ones, and ranks padded in a layer."""
    ours = with_random_b(surgery.add_lora(base, key=jax.random.key(7), rank=8, alpha=16.0,
                                          targets=("q_proj", "k_proj", "v_proj", "o_proj")), 1)
    for name, model in [("add_lora", ours), *loaded.items(), ("mixed", mixed)]:
        g4.save_adapters(model, tmp_path / name)
        back = g4.load_adapters(g4.load(SMALL_CHECKPOINT), tmp_path / name)
        assert bool(eqx.tree_equal(back, model)), name
        assert all(np.array_equal(x, y) for x, y in zip(logits(back), logits(model))), name
        assert sorted(os.listdir(tmp_path / name)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saving_again_replaces_the_adapter_and_keeps_the_readme(loaded, tmp_path):
    folder = tmp_path / "a"
    g4.save_adapters(loaded["adapter"], folder)
    (folder / "README.md").write_text("my adapter")
    g4.save_adapters(loaded["adapter_patterns"], folder)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    (folder / "other.safetensors").write_bytes(b"")
    with pytest.raises(adapters.AdapterError, match=r"holds weights that are not this adapter's \(other.safetensors"):
        g4.save_adapters(loaded["adapter"], folder)


def test_the_adapter_folder_is_small(base, tmp_path):
    """rank 8 on q/k/v/o of the small checkpoint: under 5% of the model's bytes (measured: 2.7%)."""
    model = surgery.add_lora(base, key=jax.random.key(0), rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    g4.save_adapters(model, tmp_path / "a")
    folder = sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eqx.filter(base, eqx.is_array)))
    assert folder < 0.05 * weights, (folder, weights)
    assert folder < 0.05 * (SMALL_CHECKPOINT / "model.safetensors").stat().st_size
    # the same tensors PEFT wrote for the same adapter, byte for byte in size
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_size == pytest.approx(
        (FIXTURES / "adapter" / "adapter_model.safetensors").stat().st_size, rel=0.01)


# ---- ours load in PEFT ----------------------------------------------------------------------------
def _peft_python() -> str:
    for venv in CANDIDATES:
        if (venv / "bin" / "python").is_file() and list(venv.glob("lib/python3*/site-packages/peft/__init__.py")):
            return str(venv / "bin" / "python")
    message = f"no reference venv with transformers and peft: looked in {', '.join(map(str, CANDIDATES))}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI: .ci/run creates .venv-hf with peft)")
    pytest.skip(message)


def test_peft_loads_ours_to_the_same_logits(loaded, base, tmp_path):
    """One adapter with everything ours can hold: the per-layer form (rslora scales, rank 4 / 8, layers without
    adapters), add_lora's uniform form on MLP projections of two layers (alpha 5 / rank 3: a scaling that is no
    power of two) on a regrouped stack, and the full layer's k_proj (its values). PEFT loads it (the oracle
    refuses missing, dropped or renamed tensors and unknown config keys) and gives our logits."""
    python = _peft_python()
    model = with_random_b(surgery.add_lora(loaded["adapter_patterns"], key=jax.random.key(3), rank=3, alpha=5.0,
                                           targets=("gate_proj", "down_proj"), layers=[1, 2]), 2)
    assert model.layers.cache_slots is not None  # regrouped
    g4.save_adapters(model, tmp_path / "ours", base_model_name_or_path="gemma4_eqx/assets/small")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] and len(config["target_modules"]) == 15
    out = tmp_path / "peft.npz"
    run = subprocess.run([python, str(ROOT / "scripts" / "peft_oracle.py"), "--base", str(SMALL_CHECKPOINT),
                          "--adapter", str(tmp_path / "ours"), "--ids", json.dumps([x.tolist() for x in IDS]),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    peft = np.load(out)
    reference = [peft[f"logits/{i}"] for i in range(3)]
    scaling = {p: m["scaling"] for p, m in json.loads(str(peft["meta"]))["modules"].items()}
    assert scaling["model.language_model.layers.1.mlp.gate_proj"] == 5 / 3
    assert max_diff(logits(model), reference) < TOL
    # and back here, onto the stock layout
    back = g4.load_adapters(base, tmp_path / "ours")
    assert back.layers.cache_slots is None
    assert max_diff(logits(back), reference) < TOL


# ---- refusals -------------------------------------------------------------------------------------
def _copy(src: pathlib.Path, dst: pathlib.Path, edit=None) -> pathlib.Path:
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora = True: DoRA"),
    ("fan_in_fan_out", True, "fan_in_fan_out = True"),
    ("bias", "all", "bias = 'all'"),
    ("lora_bias", True, "lora_bias = True"),
    ("modules_to_save", ["lm_head"], r"modules_to_save = \['lm_head'\]"),
    ("trainable_token_indices", [5, 6], r"trainable_token_indices = \[5, 6\]"),
    ("layer_replication", [[0, 4], [2, 6]], "layer_replication"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
    ("alora_invocation_tokens", [7, 8], "alora_invocation_tokens"),
    ("peft_type", "IA3", "peft_type = 'IA3': expected 'LORA'"),
    ("task_type", "SEQ_CLS", "task_type = 'SEQ_CLS'"),
    ("init_lora_weights", "pissa", "init_lora_weights = 'pissa'"),
    ("some_future_switch", {"on": True}, "some_future_switch .*a field this reader does not know"),
    ("r", 0, "r = 0: expected a positive integer"),
    ("layers_to_transform", [0, 3], "layers_to_transform .*with a regular expression as target_modules"),
])
def test_what_plain_lora_cannot_honour_is_refused_by_name(base, tmp_path, field, value, message):
    folder = _copy(FIXTURES / "adapter", tmp_path / "a", lambda c: c.__setitem__(field, value))
    with pytest.raises(adapters.AdapterError, match=f"adapter_config.json: {message}"):
        g4.load_adapters(base, folder)


def _rewrite_tensors(folder: pathlib.Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    f = SafetensorsFile(str(path))
    tensors = edit({name: f.read(name) for name in f.keys()})
    path.unlink()
    items = sorted(tensors.items())
    write_file(str(path), [(n, {np.dtype(np.float32): "F32"}[t.dtype], t.shape) for n, t in items], iter(items))


PREFIX = "base_model.model.model.language_model.layers."


def test_a_tensor_no_module_takes_is_refused(base, tmp_path):
    folder = _copy(FIXTURES / "adapter_patterns", tmp_path / "a")  # layers 0, 3, 5 only
    _rewrite_tensors(folder, lambda t: {**t, f"{PREFIX}4.self_attn.q_proj.lora_A.weight": np.zeros((8, 128),
                                                                                                   np.float32)})
    with pytest.raises(adapters.AdapterError, match=r"layers\.4\.self_attn\.q_proj.lora_A.weight' matches no adapted "
                                                    r"module: .* is not targeted .*layers_to_transform \[0, 3, 5\]"):
        g4.load_adapters(base, folder)


def test_a_targeted_module_without_tensors_is_refused(base, tmp_path):
    folder = _copy(FIXTURES / "adapter", tmp_path / "a")
    _rewrite_tensors(folder, lambda t: {k: v for k, v in t.items() if not k.startswith(f"{PREFIX}2.self_attn.o_proj")})
    with pytest.raises(adapters.AdapterError, match=r"no lora_A/B tensor for model\.language_model\.layers\.2\."
                                                    r"self_attn\.o_proj, which adapter_config.json targets"):
        g4.load_adapters(base, folder)


def test_a_shape_that_disagrees_with_the_config_is_refused(base, tmp_path):
    folder = _copy(FIXTURES / "adapter_patterns", tmp_path / "a", lambda c: c.__setitem__("rank_pattern",
                                                                                          {"o_proj": 2}))
    with pytest.raises(adapters.AdapterError, match=r"layers\.0\.self_attn\.o_proj\.lora_A\.weight has shape "
                                                    r"\[4, 128\], expected \[2, 128\] \(rank 2"):
        g4.load_adapters(base, folder)


def test_a_dora_magnitude_and_a_target_outside_the_decoder_are_refused(base, tmp_path):
    folder = _copy(FIXTURES / "adapter", tmp_path / "a")
    _rewrite_tensors(folder, lambda t: {**t, f"{PREFIX}0.self_attn.q_proj.lora_magnitude_vector":
                                        np.ones(128, np.float32)})
    with pytest.raises(adapters.AdapterError, match="lora_magnitude_vector' is not a LoRA weight"):
        g4.load_adapters(base, folder)
    folder = _copy(FIXTURES / "adapter", tmp_path / "b", lambda c: c.__setitem__("target_modules", "all-linear"))
    with pytest.raises(adapters.AdapterError, match=r"selects model\.embed_vision\.patch_dense .*only the text "
                                                    "decoder's projections"):
        g4.load_adapters(base, folder)


def test_wrong_folders_say_what_they_are(base, loaded, tmp_path):
    with pytest.raises(g4.CheckpointError, match=r"an adapter folder .*g4\.load_adapters\(g4\.load\(BASE\), "):
        g4.load(FIXTURES / "adapter")
    (tmp_path / "edited").mkdir()
    shutil.copy(SMALL_CHECKPOINT / "config.json", tmp_path / "edited")
    (tmp_path / "edited" / "model.eqx").write_bytes(b"")
    with pytest.raises(g4.CheckpointError, match=r"model\.eqx \(written by g4\.surgery\.save\).*g4\.surgery\.load"):
        g4.load(tmp_path / "edited")
    with pytest.raises(adapters.AdapterError, match="no adapter_config.json; this is a model checkpoint"):
        g4.load_adapters(base, SMALL_CHECKPOINT)
    with pytest.raises(adapters.AdapterError, match="holds a model .*config.json.*folder of their own"):
        g4.save_adapters(loaded["adapter"], tmp_path / "edited")
    with pytest.raises(adapters.AdapterError, match="holds no LoRA adapters"):
        g4.save_adapters(base, tmp_path / "none")
    with pytest.raises(adapters.AdapterError, match="already holds LoRA adapters"):
        g4.load_adapters(loaded["adapter"], FIXTURES / "adapter")
    assert g4.adapters is adapters and g4.load_adapters is adapters.load_adapters
