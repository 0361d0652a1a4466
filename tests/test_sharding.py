"""Sharding: partition rules, and the model loaded, run, trained, generated from and saved on 8 devices.

The 8-device checks run once, in a subprocess (`tests/sharded_checks.py`, which says why); the tests below
read its measurements. Rule resolution is checked here directly, on abstract meshes and the abstract 12B.
"""

import json
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import gemma4_eqx as g4
from gemma4_eqx.model import sharding as gs

HERE = pathlib.Path(__file__).parent
MESHES = ["fsdp8", "fsdp2_tp4", "fsdp4_tp2"]
SIZES = {"fsdp8": (8, 1), "fsdp2_tp4": (2, 4), "fsdp4_tp2": (4, 2)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run([sys.executable, str(HERE / "sharded_checks.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"sharded_checks.py failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- on 8 devices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_logits_equal_unsharded(sharded, mesh):
    r = sharded["meshes"][mesh]
    assert r["logits_max_diff"] <= 1e-5  # float64: only the reduction order differs
    assert r["logits_max_diff_fp32"] <= 1e-4  # float32, logits up to ~24: a few ulps


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_gradient_step_equals_unsharded(sharded, mesh):
    r = sharded["meshes"][mesh]
    assert r["step_change"] > 1e-3  # the step does move the weights
    assert r["step_max_diff"] <= 1e-8
    assert r["loss_diff"] <= 1e-10


@pytest.mark.parametrize("mesh", MESHES)
def test_every_parameter_has_the_sharding_its_rule_names(sharded, mesh):
    r = sharded["meshes"][mesh]
    for where in ("load", "step"):  # as loaded, and after the jitted step
        assert r[where]["mismatches"] == [], where
        assert r[where]["stacked_axes_unsharded"], where
    assert r["load_max_diff"] == 0.0


@pytest.mark.parametrize("mesh", MESHES)
def test_fsdp_tp_specs_by_hand(sharded, mesh):
    specs = sharded["meshes"][mesh]["load"]["specs"]
    assert specs["embed_tokens"] == ["tp", "fsdp"]
    assert specs["sliding.q_proj"] == [None, None, "fsdp", "tp"]
    assert specs["sliding.k_proj"] == [None, None, "fsdp", "tp"]
    assert specs["sliding.o_proj"] == [None, None, "tp", "fsdp"]
    assert specs["mlp.down_proj"] == [None, None, "tp", "fsdp"]
    assert specs["full.k_proj"] == [None, None, "fsdp"]  # the single global KV head: whole along tp
    assert specs["norm"] == [] and specs["layer_scalar"] == []
    f, t = SIZES[mesh]
    assert specs["q_proj_shard_shape"] == [2, 5, 96 // f, 96 // t]  # tiny_b: hidden 96, 6 heads x 16


def test_logits_are_sharded_along_the_batch(sharded):
    assert sharded["meshes"]["fsdp2_tp4"]["logits_sharded"]


def test_mesh_with_only_a_tp_axis(sharded):
    r = sharded["tp_only"]
    assert r["mismatches"] == []
    assert r["specs"]["embed_tokens"] == ["tp"]
    assert r["specs"]["sliding.q_proj"] == [None, None, None, "tp"]
    assert r["specs"]["sliding.o_proj"] == [None, None, "tp"]
    assert r["specs"]["full.k_proj"] == []
    assert r["logits_max_diff_fp32"] <= 1e-4


def test_fsdp_preset(sharded):
    r = sharded["fsdp_rules"]
    assert r["mismatches"] == []
    assert r["specs"]["sliding.q_proj"] == [None, None, "fsdp"]
    assert r["specs"]["embed_tokens"] == ["fsdp"]


def test_generate_runs_sharded(sharded):
    assert sharded["generate_equal_hf"]  # greedy tokens transformers recorded, left-padded batch of 3


def test_stacked_leaves_built_layer_by_layer_on_their_devices(sharded):
    r = sharded["layer_by_layer"]  # the path taken for accelerators, forced here on CPU devices
    assert r["mismatches"] == [] and r["stacked_axes_unsharded"]
    assert r["max_diff"] == 0.0


def test_save_from_a_sharded_model(sharded):
    files = sharded["saved_files"]
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert sharded["save_round_trip_max_diff"] == 0.0


# ---- rule resolution (no devices needed) -----------------------------------------------------------
MESH_2x4 = AbstractMesh((2, 4), ("fsdp", "tp"))


def test_a_dimension_that_does_not_divide_is_replicated_not_padded():
    rules = ((r"w$", P("fsdp", "tp")),)
    assert gs.partition_spec("w", (6, 12), 0, MESH_2x4, rules) == P("fsdp", "tp")
    assert gs.partition_spec("w", (6, 10), 0, AbstractMesh((4, 2), ("fsdp", "tp")), rules) == P(None, "tp")
    assert gs.partition_spec("w", (5, 7), 0, MESH_2x4, rules) == P()


def test_a_tuple_of_axes_drops_axes_until_it_divides():
    rules = ((r"w$", P(("fsdp", "tp"))),)
    assert gs.partition_spec("w", (16,), 0, MESH_2x4, rules) == P(("fsdp", "tp"))
    assert gs.partition_spec("w", (6,), 0, MESH_2x4, rules) == P("fsdp")


def test_stacked_axes_stay_unsharded():
    rules = ((r"w$", P("fsdp", "tp")),)
    assert gs.partition_spec("w", (3, 5, 8, 8), 2, MESH_2x4, rules) == P(None, None, "fsdp", "tp")


def test_axes_the_mesh_lacks_are_ignored():
    rules = ((r"w$", P("fsdp", "tp")),)
    assert gs.partition_spec("w", (8, 8), 0, AbstractMesh((8,), ("tp",)), rules) == P(None, "tp")


def test_first_matching_rule_wins_and_unmatched_is_replicated():
    rules = ((r"special\.w$", P("tp")), (r"w$", P("fsdp")))
    assert gs.partition_spec("a.special.w", (8,), 0, MESH_2x4, rules) == P("tp")
    assert gs.partition_spec("a.other.w", (8,), 0, MESH_2x4, rules) == P("fsdp")
    assert gs.partition_spec("a.bias", (8,), 0, MESH_2x4, rules) == P()


def test_a_rule_longer_than_the_parameter_is_an_error():
    with pytest.raises(ValueError, match=r"norm\.weight: rule spec .* has 2 entries for a parameter of shape \(8,\)"):
        gs.partition_spec("norm.weight", (8,), 0, MESH_2x4, ((r".", P("fsdp", "tp")),))


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (8, 1), (1, 8), (2, 8)])
def test_12b_fsdp_tp_rules(shape):
    """On the real widths every rule applies as written: nothing falls back to replication by accident."""
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(g4.Gemma4Config.gemma4_12b(), key=jax.random.key(0)))
    mesh = AbstractMesh(shape, ("fsdp", "tp"))
    specs = {path: spec for path, _, spec in gs.describe(abstract, mesh, gs.FSDP_TP)}
    assert specs["embed_tokens"] == P("tp", "fsdp")
    assert specs["layers.runs.0.sliding_attention.self_attn.q_proj.weight"] == P(None, None, "fsdp", "tp")
    assert specs["layers.runs.0.sliding_attention.self_attn.v_proj.weight"] == P(None, None, "fsdp", "tp")
    assert specs["layers.runs.1.full_attention.self_attn.q_proj.weight"] == P(None, None, "fsdp", "tp")
    assert specs["layers.runs.1.full_attention.self_attn.k_proj.weight"] == P(None, None, "fsdp")
    assert specs["layers.runs.1.full_attention.self_attn.o_proj.weight"] == P(None, None, "tp", "fsdp")
    assert specs["layers.runs.0.sliding_attention.mlp.gate_proj.weight"] == P(None, None, "fsdp", "tp")
    assert specs["layers.runs.0.sliding_attention.mlp.down_proj.weight"] == P(None, None, "tp", "fsdp")
    assert specs["layers.runs.0.sliding_attention.input_layernorm.weight"] == P()
    assert specs["embed_vision.patch_dense.weight"] == P(None, "fsdp")
    assert specs["embed_audio.projection.embedding_projection.weight"] == P(None, "fsdp")


# ---- one device ------------------------------------------------------------------------------------
def test_make_mesh_axes_and_sizes():
    mesh = gs.make_mesh()
    assert mesh.axis_names == ("fsdp", "tp") and dict(mesh.shape) == {"fsdp": 1, "tp": 1}
    with pytest.raises(ValueError, match=r"fsdp=2: expected a positive divisor of the 1 devices"):
        gs.make_mesh(fsdp=2)


def test_load_onto_a_one_device_mesh(tmp_path):
    folder = HERE / "fixtures" / "hf" / "tiny_a" / "checkpoint"
    model = g4.load(folder, mesh=gs.make_mesh())
    plain = g4.load(folder)
    for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert isinstance(model.layers.runs[0].self_attn.q_proj.weight.sharding, jax.sharding.NamedSharding)


def test_rules_without_a_mesh_are_refused():
    with pytest.raises(ValueError, match="rules: given without a mesh"):
        g4.load(HERE / "fixtures" / "hf" / "tiny_a" / "checkpoint", rules=gs.FSDP)


def test_lora_wrapped_projections_keep_their_sharding():
    """`surgery.add_lora` moves a projection's matrix to `..._proj.base.weight`: the rules still shard it; the
    adapters are replicated."""
    from gemma4_eqx import surgery
    model = eqx.filter_eval_shape(lambda: g4.Gemma4(g4.Gemma4Config.gemma4_12b(), key=jax.random.key(0)))
    adapted = eqx.filter_eval_shape(lambda m: surgery.add_lora(m, key=jax.random.key(1), rank=2,
                                                               targets=("q_proj", "down_proj")), model)
    plain = {name: spec for name, _, spec in gs.describe(model, MESH_2x4, gs.FSDP_TP)}
    wrapped = {name: spec for name, _, spec in gs.describe(adapted, MESH_2x4, gs.FSDP_TP)}
    bases = [n for n in wrapped if n.endswith(".base.weight")]
    assert bases and any("q_proj" in n for n in bases) and any("down_proj" in n for n in bases)
    for name in bases:
        assert wrapped[name] == plain[name.replace(".base.weight", ".weight")] != P(), name
    assert all(spec == P() for name, spec in wrapped.items() if ".lora_" in name)
