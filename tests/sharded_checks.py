"""Sharded-model checks on 8 simulated CPU devices; `tests/test_sharding.py` runs this file in a subprocess.

JAX fixes its device count when it initialises, and the pytest session has already initialised it with one
device, so these checks run in a fresh interpreter with `--xla_force_host_platform_device_count=8`. It prints
one JSON object of measurements and the test file turns each field into an assertion.

    .venv/bin/python tests/sharded_checks.py OUT_DIR

Model: the recorded transformers fixture `tests/fixtures/hf/tiny_b` (12 layers, hidden 96, 6 heads, 2 KV heads,
global head 64). Logits and the gradient step are compared in float64 (`jax.enable_x64`), where the only
difference between a sharded and an unsharded program is the order of reductions, so "equal within 1e-5"
is a statement about the sharding, not about float32 rounding; the float32 differences are reported as well.
XLA's backend optimisation level is lowered to 0 to halve compile times (both sides compile the same way).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

import gemma4_eqx as g4  # noqa: E402
from gemma4_eqx.model import sharding as gs  # noqa: E402
from gemma4_eqx.io.checkpoint import load_from_folder  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "fixtures", "hf", "tiny_b", "checkpoint")
CASES = os.path.join(HERE, "fixtures", "hf", "tiny_b", "cases.npz")
LR = 0.5
BATCH, SEQ = 8, 12  # SEQ > the small config's sliding window (8)


def sgd_step_fn(static, out_shardings=None):
    """One jitted SGD step on the next-token loss; returns (loss, logits, new params).

    With `out_shardings` the new parameters keep the shardings the rules name. The logits come out of the same
    program, so each mesh compiles once.
    """

    def step(params, ids):
        def loss_fn(p):
            logits = jax.vmap(eqx.combine(p, static))(ids)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, jax.tree.map(lambda p, g: p - LR * g, params, grads)

    return jax.jit(step, out_shardings=None if out_shardings is None else (None, None, out_shardings))


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec_of(x) -> list:
    """A leaf's sharding spec as JSON (trailing Nones dropped, as NamedSharding normalises them)."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def sharding_mismatches(model, mesh, rules) -> list[str]:
    """Leaves whose sharding is not the one the rules name (the applied spec on this mesh)."""
    expected = gs.param_shardings(model, mesh, rules)
    bad = []
    for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(model)[0], jax.tree.leaves(expected)):
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}")
    return bad


def named_specs(model) -> dict[str, list]:
    """The specs of a few parameters the tests spell out by hand."""
    return {
        "embed_tokens": spec_of(model.embed_tokens),
        "sliding.q_proj": spec_of(model.layers.runs[0].self_attn.q_proj.weight),
        "sliding.k_proj": spec_of(model.layers.runs[0].self_attn.k_proj.weight),
        "sliding.o_proj": spec_of(model.layers.runs[0].self_attn.o_proj.weight),
        "full.k_proj": spec_of(model.layers.runs[1].self_attn.k_proj.weight),
        "full.q_proj": spec_of(model.layers.runs[1].self_attn.q_proj.weight),
        "mlp.down_proj": spec_of(model.layers.runs[0].mlp.down_proj.weight),
        "norm": spec_of(model.norm.weight),
        "layer_scalar": spec_of(model.layers.runs[0].layer_scalar),
        "q_proj_shard_shape": list(model.layers.runs[0].self_attn.q_proj.weight.addressable_shards[0].data.shape),
    }


def shard_specs(model, mesh, rules) -> dict:
    return {"specs": named_specs(model), "mismatches": sharding_mismatches(model, mesh, rules),
            "stacked_axes_unsharded": all(tuple(leaf.sharding.spec)[:2] in ((), (None,), (None, None))
                                          for run in model.layers.runs for leaf in jax.tree.leaves(run))}


class Reference:
    """The unsharded model on one device: fp64 logits and SGD step, fp32 logits."""

    def __init__(self, ids):
        self.ids = ids
        self.forward = jax.jit(lambda m, x: jax.vmap(m)(x))
        self.model32 = g4.load(CHECKPOINT, dtype=jnp.float32)
        self.logits32 = self.forward(self.model32, ids)
        with jax.enable_x64(True):
            self.model64 = g4.load(CHECKPOINT, dtype=jnp.float64)
            params, static = eqx.partition(self.model64, eqx.is_array)
            self.params64 = params
            self.loss64, self.logits64, self.step64 = sgd_step_fn(static)(params, ids)


def check_mesh(ref: Reference, mesh, rules) -> dict:
    """Load onto the mesh; shardings as the rules name; logits and one SGD step equal to the unsharded ones."""
    r: dict = {"mesh_shape": dict(mesh.shape)}
    batch = jax.device_put(ref.ids, gs.batch_sharding(mesh, ref.ids.shape))
    loaded32 = g4.load(CHECKPOINT, dtype=jnp.float32, mesh=mesh, rules=rules)
    r["load"] = shard_specs(loaded32, mesh, rules)
    r["load_max_diff"] = max_diff(loaded32, ref.model32)
    logits = ref.forward(loaded32, batch)
    r["logits_max_diff_fp32"] = max_diff(logits, ref.logits32)
    r["logits_sharded"] = not logits.sharding.is_fully_replicated
    with jax.enable_x64(True):
        sharded = g4.load(CHECKPOINT, dtype=jnp.float64, mesh=mesh, rules=rules)
        params, static = eqx.partition(sharded, eqx.is_array)
        shardings, _ = eqx.partition(gs.param_shardings(sharded, mesh, rules), lambda s: isinstance(s, NamedSharding))
        loss, logits, new_params = sgd_step_fn(static, shardings)(params, batch)
        r["logits_max_diff"] = max_diff(logits, ref.logits64)
        r["loss_diff"] = abs(float(loss) - float(ref.loss64))
        r["step_max_diff"] = max_diff(new_params, ref.step64)
        r["step_change"] = max_diff(new_params, ref.params64)  # the step moved the weights (not a no-op)
        r["step"] = shard_specs(eqx.combine(new_params, static), mesh, rules)
    return r


def run_checks(out_dir: str, ref: Reference) -> dict:
    out: dict = {"meshes": {name: check_mesh(ref, gs.make_mesh(fsdp=f, tp=t), gs.FSDP_TP)
                            for name, (f, t) in (("fsdp8", (8, 1)), ("fsdp2_tp4", (2, 4)), ("fsdp4_tp2", (4, 2)))}}
    # A mesh with a single "tp" axis, placed by shard_model from a model in memory, with the TP preset.
    tp_mesh = Mesh(np.array(jax.devices()), ("tp",))
    tp_model = gs.shard_model(ref.model32, tp_mesh, gs.TP)
    out["tp_only"] = shard_specs(tp_model, tp_mesh, gs.TP)
    batch = jax.device_put(ref.ids, gs.batch_sharding(tp_mesh, ref.ids.shape))
    out["tp_only"]["logits_max_diff_fp32"] = max_diff(ref.forward(tp_model, batch), ref.logits32)
    fsdp_mesh = gs.make_mesh(fsdp=8)
    out["fsdp_rules"] = shard_specs(gs.shard_model(ref.model32, fsdp_mesh, gs.FSDP), fsdp_mesh, gs.FSDP)
    # generate on the (2, 4) mesh: the greedy tokens transformers recorded for a left-padded batch.
    mesh = gs.make_mesh(fsdp=2, tp=4)
    model = g4.load(CHECKPOINT, dtype=jnp.float32, mesh=mesh)
    case = np.load(CASES)
    tokens = g4.generate(model, case["gen_left_pad/input_ids"], attention_mask=case["gen_left_pad/attention_mask"],
                         max_new_tokens=case["gen_left_pad/generated"].shape[1], temperature=0.0)
    out["generate_equal_hf"] = bool(np.array_equal(np.asarray(tokens), case["gen_left_pad/generated"]))
    # stacked leaves built on their devices one layer's tensor at a time (the accelerator path), forced on CPU
    by_layer = load_from_folder(CHECKPOINT, dtype=jnp.float32, mesh=mesh, layer_by_layer=True)
    out["layer_by_layer"] = shard_specs(by_layer, mesh, gs.FSDP_TP)
    out["layer_by_layer"]["max_diff"] = max_diff(by_layer, ref.model32)
    # save from the sharded model (gathered tensor by tensor), sharded files + index, and load it back
    folder = os.path.join(out_dir, "from_sharded")
    g4.save(model, folder, max_shard_size="300KB")
    out["saved_files"] = sorted(os.listdir(folder))
    out["save_round_trip_max_diff"] = max_diff(g4.load(folder), ref.model32)
    return out


def main(out_dir: str) -> dict:
    t0 = time.perf_counter()
    assert jax.device_count() == 8, f"expected 8 simulated devices, found {jax.device_count()}"
    ids = jax.random.randint(jax.random.key(7), (BATCH, SEQ), 3, 500, dtype=jnp.int32)
    ref = Reference(ids)
    out = run_checks(out_dir, ref)
    out["seconds"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
