"""Per-device memory of a 12B training step (LoRA and full fine-tuning) on an 8-device FSDP x TP mesh, from XLA.

    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_12b.py [--fsdp 4 --tp 2] [--seq 8192]
        [--steps lora full] [--remat off on dots_saveable] [--lora-rank 16] [--json FILE]

Nothing is materialised: the real 12B config (`Gemma4Config.gemma4_12b()`) is built with `eqx.filter_eval_shape`,
every parameter, optimizer-state and batch leaf is a `jax.ShapeDtypeStruct` carrying the `NamedSharding` that
`gemma4_eqx.sharding.FSDP_TP` names for it, and the step is `jax.jit(...).lower(...).compile()`d for
`--xla_force_host_platform_device_count=8` CPU devices. XLA's `memory_analysis()` of the compiled SPMD program
is per device: arguments (parameters, optimizer state, batch shard), outputs, temporaries (activations kept for
the backward pass, gradients, gathered weights, the loss's tiles) and generated code; the parameters and
optimizer state are donated, so the outputs alias them (`alias` bytes are counted in both).

The step is `gemma4_eqx.train`'s: `batch_loss` (the blocked cross-entropy of `g4.losses.next_token_nll`, logits
never `[seq, vocab]`), `eqx.filter_value_and_grad`, an optax AdamW update, `eqx.apply_updates`. Parameters are
bf16; AdamW's first moment is fp32 (`mu_dtype`), its second moment follows the parameters (bf16). One sequence
of `--seq` tokens per data-parallel rank: the batch is `fsdp` sequences, split along the "fsdp" axis; the "tp"
ranks of a group share their sequence.

- "lora": `g4.surgery.add_lora(rank, targets q/k/v/o)` on every layer, only the adapters train
  (`g4.surgery.only_lora`); the frozen base weights are sharded like the stock model (the rule patterns also
  match the wrapped `...q_proj.base.weight` paths), the adapters replicated.
- "full": every floating array trains.

`--remat`: the decoder layer body's `jax.checkpoint` policy (`g4.Remat`): "off" (nothing recomputed: every
layer's activations kept), "on" (the whole layer recomputed in the backward pass, only its input kept), or a
`jax.checkpoint_policies` name (e.g. "dots_saveable": keep matmul outputs, recompute the rest).
"""

from __future__ import annotations

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import gemma4_eqx as g4  # noqa: E402
from gemma4_eqx.model import sharding as gs  # noqa: E402
from gemma4_eqx import surgery  # noqa: E402
from gemma4_eqx.train import batch_loss, with_remat  # noqa: E402

GIB = 2**30


def abstract_model(steps: str, rank: int, dtype):
    cfg = g4.Gemma4Config.gemma4_12b()

    def build():
        model = g4.Gemma4(cfg, key=jax.random.key(0), dtype=dtype)
        if steps == "lora":
            model = surgery.add_lora(model, key=jax.random.key(1), rank=rank,
                                     targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        return model

    return eqx.filter_eval_shape(build)


def lora_spec(model):
    """`g4.surgery.only_lora` for an abstract model: True on every adapter (`lora_a`, `lora_b`), False elsewhere
    (`only_lora` tests `eqx.is_inexact_array`, which a `ShapeDtypeStruct` is not)."""
    is_lora = lambda x: isinstance(x, surgery.LoRALinear)
    off = lambda tree: jax.tree.map(lambda _: False, tree)
    mark = lambda x: eqx.tree_at(lambda l: (l.lora_a, l.lora_b), off(x), (True, True)) if is_lora(x) else off(x)
    return jax.tree.map(mark, model, is_leaf=is_lora)


def measure(kind: str, remat: str, *, mesh, seq: int, rank: int, lr: float = 1e-5) -> dict:
    dtype = jnp.bfloat16
    model = abstract_model(kind, rank, dtype)
    rules = gs.FSDP_TP
    is_sds = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    spec = lora_spec(model) if kind == "lora" else jax.tree.map(is_sds, model)
    param_shard = gs.param_shardings(model, mesh, rules)
    arrays, static = eqx.partition(model, is_sds)
    shard_arrays, _ = eqx.partition(param_shard, lambda s: isinstance(s, NamedSharding))
    arrays = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays, shard_arrays)
    model = eqx.combine(arrays, static)
    params, frozen = eqx.partition(model, spec)

    optimizer = optax.adamw(lr, mu_dtype=jnp.float32)
    # the moments mirror the parameters: give each the parameter's sharding; the step count is replicated
    replicated = NamedSharding(mesh, P())
    opt_state = jax.eval_shape(optimizer.init, params)

    def shard_state(state):
        def per_moment(moment):
            return jax.tree.map(lambda m, p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=p.sharding), moment,
                                params)
        out = []
        for s in state:
            if isinstance(s, optax.ScaleByAdamState):
                s = optax.ScaleByAdamState(count=jax.ShapeDtypeStruct(s.count.shape, s.count.dtype,
                                                                       sharding=replicated),
                                           mu=per_moment(s.mu), nu=per_moment(s.nu))
            else:
                s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), s)
            out.append(s)
        return tuple(out)

    opt_state = shard_state(opt_state)
    b = mesh.shape[gs.FSDP_AXIS]  # one sequence per data-parallel rank
    batch_sh = gs.batch_sharding(mesh, (b, seq))
    batch = {"input_ids": jax.ShapeDtypeStruct((b, seq), jnp.int32, sharding=batch_sh),
             "attention_mask": jax.ShapeDtypeStruct((b, seq), jnp.bool_, sharding=batch_sh)}
    policy = g4.layers.policy.as_remat({"off": False, "on": True}.get(remat, remat))

    def loss_of(params, frozen, batch):
        return batch_loss(with_remat(eqx.combine(params, frozen), policy), batch)

    def step(params, opt_state, frozen, batch):
        loss, grads = eqx.filter_value_and_grad(loss_of)(params, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # fp32 updates (from the fp32 first moment) applied in the parameters' dtype, as optax.apply_updates does;
        # eqx.apply_updates would promote the bf16 parameters to fp32 (and nothing could be donated)
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    # split off the static parts (eqx.partition leaves None / non-arrays): jit over arrays only
    p_arr, p_static = eqx.partition(params, is_sds)
    f_arr, f_static = eqx.partition(frozen, is_sds)

    def jitted(p_arr, opt_state, f_arr, batch):
        params, frozen = eqx.combine(p_arr, p_static), eqx.combine(f_arr, f_static)
        new, opt_state, loss = step(params, opt_state, frozen, batch)
        return eqx.filter(new, eqx.is_array), opt_state, loss

    out_shardings = (jax.tree.map(lambda x: x.sharding, p_arr), jax.tree.map(lambda x: x.sharding, opt_state),
                     replicated)
    fn = jax.jit(jitted, donate_argnums=(0, 1), out_shardings=out_shardings)
    t0 = time.perf_counter()
    lowered = fn.lower(p_arr, opt_state, f_arr, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return {"step": kind, "remat": policy.name, "seq": seq, "batch": b,
            "mesh": f"fsdp {mesh.shape[gs.FSDP_AXIS]} x tp {mesh.shape[gs.TP_AXIS]}",
            "trainable": count(p_arr), "frozen": count(f_arr),
            "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
            "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
            "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def table(rows: list[dict]) -> str:
    head = ("| step | remat | mesh | seq x batch | trainable | arguments | outputs (aliased) | temporaries | code "
            "| args + temp | compile |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        g = lambda k: f"{r[k] / GIB:.2f} GiB"
        lines.append(f"| {r['step']} | {r['remat']} | {r['mesh']} | {r['seq']} x {r['batch']} | {r['trainable']:,} "
                     f"| {g('argument')} | {g('output')} ({g('alias')}) | {g('temp')} | {r['code'] / 2**20:.1f} MiB "
                     f"| {(r['argument'] + r['temp']) / GIB:.2f} GiB | {r['lower_s'] + r['compile_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fsdp", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", nargs="*", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--remat", nargs="*", default=["off", "on"])
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--json", default=None, help="also append each row as a JSON line to this file")
    args = ap.parse_args()
    mesh = gs.make_mesh(fsdp=args.fsdp, tp=args.tp, devices=jax.devices()[:args.fsdp * args.tp])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"{jax.device_count()} x {jax.devices()[0].platform} devices; 12B, bf16 params, AdamW (mu fp32)",
          flush=True)
    rows = []
    for kind in args.steps:
        for remat in args.remat:
            r = measure(kind, remat, mesh=mesh, seq=args.seq, rank=args.lora_rank)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
