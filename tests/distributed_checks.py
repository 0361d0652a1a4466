"""Two JAX processes on one machine (`jax.distributed`, localhost, CPU): a sharded load, forward and gradient step
across processes equal one process. `tests/test_distributed.py` starts two of these and reads what they print.

    .venv/bin/python tests/distributed_checks.py PROCESS_ID PORT OUT_JSON

Each process owns 2 CPU devices, so the global mesh is fsdp=2 x tp=2 over 4 devices split between the processes.
The model is the recorded transformers fixture `tests/fixtures/hf/tiny_b`, in float64 so that "equal" is about
the sharding and the communication, not float32 reduction order. The one-process reference is computed by each
process on its own first device, unsharded, from the same checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import gemma4_eqx as g4  # noqa: E402
from gemma4_eqx.model import sharding as gs  # noqa: E402
from gemma4_eqx import train  # noqa: E402

CHECKPOINT = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny_b" / "checkpoint"

assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
mesh = gs.make_mesh(fsdp=2, tp=2)

# The same batch in both processes (2 sequences: one per fsdp rank).
rng = np.random.default_rng(0)
ids = rng.integers(3, 400, (2, 24)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool)}

# ---- sharded: loaded straight onto the global mesh -------------------------------------------------------------
sharded = g4.load(CHECKPOINT, dtype=jnp.float64, mesh=mesh)
placed = [x.sharding.mesh.shape for x in jax.tree.leaves(sharded) if isinstance(x, jax.Array)]
batch_sharding = NamedSharding(mesh, P("fsdp"))
global_batch = {k: multihost_utils.host_local_array_to_global_array(v[process_id:process_id + 1], mesh, P("fsdp"))
                for k, v in batch.items()}
logits_fn = eqx.filter_jit(lambda m, b: jax.vmap(lambda i, a: m(i, attention_mask=a))(b["input_ids"],
                                                                                          b["attention_mask"]))
sharded_logits = multihost_utils.process_allgather(logits_fn(sharded, global_batch), tiled=True)

optimizer = optax.sgd(1e-2)
step = train.make_train_step(optimizer, donate=False)
opt_state = train.init_optimizer(optimizer, sharded)
new_sharded, _, sharded_loss = step(sharded, opt_state, global_batch)
sharded_weight = multihost_utils.process_allgather(new_sharded.layers.runs[0].mlp.up_proj.weight, tiled=True)

# ---- one process: unsharded on this process's first device ------------------------------------------------------
here = jax.local_devices()[0]
local = jax.device_put(g4.load(CHECKPOINT, dtype=jnp.float64), here)
local_batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, here)
local_logits = np.asarray(logits_fn(local, local_batch))
new_local, _, local_loss = step(local, jax.device_put(train.init_optimizer(optimizer, local), here), local_batch)
local_weight = np.asarray(new_local.layers.runs[0].mlp.up_proj.weight)

result = {
    "process_id": process_id,
    "process_count": jax.process_count(),
    "global_devices": len(jax.devices()),
    "mesh": dict(mesh.shape),
    "params_on_global_mesh": all(dict(s) == dict(mesh.shape) for s in placed),
    "logits_max_diff": float(np.abs(np.asarray(sharded_logits) - local_logits).max()),
    "logits_scale": float(np.abs(local_logits).max()),
    "loss_diff": abs(float(sharded_loss) - float(local_loss)),
    "updated_weight_max_diff": float(np.abs(np.asarray(sharded_weight) - local_weight).max()),
}
pathlib.Path(out).write_text(json.dumps(result))
jax.distributed.shutdown()
