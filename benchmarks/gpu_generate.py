"""The README's path on a lent GPU, 12B shapes: `g4.generate` on the serving layout (what `g4.load(path,
layout="serving")` gives, and what the CLI, chat and server run), against the card's copy bandwidth.

    PYTHONPATH=. python3 benchmarks/gpu_generate.py --out $OUT      # on the device (random bf16 12B weights)
    .venv/bin/python benchmarks/gpu_generate.py --small             # CPU smoke run of the same code, small shapes

Rows, most important first (each in its own try, so a failing or cut-short row keeps the ones before it):
1. bf16 decode at batch 1, then int8 and int4 weights (`g4.quantize` of the serving layout) at batch 1;
2. bf16 decode at batch 8 and 32 (one `generate` call over that many prompts);
3. the continuous-batching engine (`generate.engine.Engine`) with 8 and 32 slots, every slot running: ms per step.

A `generate` row times greedy calls of 1 and of 1 + `--steps` new tokens after a `--context`-token prompt (no stop
ids, K and V cached as transformers caches them), each warmed up first (compilation not timed), median over three
pairs of the difference / steps = ms per decode step; tokens/s = rows / that. Its bandwidth roofline: (weight bytes
+ every row's KV cache at the context) / the copy bandwidth measured first (`a + 1` over 2 GiB of bf16: bytes read
plus written). Issue 38's targets: bf16 batch 1 at >= 85% of that roofline, int8 >= 1.7x and int4 >= 2.5x bf16's
tokens/s. Every figure is appended to `<out>/gpu_generate.jsonl` as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx.model.cache import cache_bytes
from gemma4_eqx.quant.modules import weight_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_12b import bench, random_on_device, text_config  # noqa: E402
from serving import step_cost  # noqa: E402


def copy_bandwidth(small: bool) -> float:
    """Bytes read plus written per second by a jitted `a + 1` over a bf16 array (2 GiB on the device)."""
    x = jnp.ones(((1 << 24) if small else (1 << 30),), jnp.bfloat16)
    t = bench(jax.jit(lambda a: a + jnp.bfloat16(1)), x)
    return 2 * x.nbytes / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes, for a CPU smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--modes", nargs="*", default=["int8", "int4"], help="quantized modes at batch 1")
    ap.add_argument("--slots", type=int, nargs="*", default=[8, 32], help="engine slots (none: skip)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "gpu_generate.jsonl"), "a")

    def add(key, value):
        log.write(json.dumps({"key": key, "value": value}, default=str) + "\n")
        log.flush()
        print(f"{key}: {value}", flush=True)

    cfg = text_config(args.small)
    context = min(args.context, 192) if args.small else args.context
    steps = 4 if args.small else args.steps
    dev = jax.devices()[0]
    add("device", dict(kind=dev.device_kind, platform=dev.platform, jax=jax.__version__, context=context, steps=steps))
    bw = copy_bandwidth(args.small)
    add("copy_bandwidth_GBps", bw / 1e9)
    t0 = time.perf_counter()
    model = g4.serving_layout(random_on_device(cfg, jnp.bfloat16), consume=True)
    jax.block_until_ready(model)
    add("model", dict(init_and_layout_s=time.perf_counter() - t0, weight_GB=weight_bytes(model) / 1e9))
    kv_row = cache_bytes(cfg, context, jnp.bfloat16, raw_keys=False)
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}

    def generate_row(name: str, m, rows: int) -> None:
        ids = jnp.asarray(rng.integers(3, cfg.text.vocab_size - 16, (rows, context)), jnp.int32)

        def gen(new: int) -> float:
            t = time.perf_counter()
            np.asarray(g4.generate(m, ids, max_new_tokens=new, temperature=0.0, stop_ids=(), cache_raw_keys=False))
            return time.perf_counter() - t

        try:
            t = time.perf_counter()
            gen(1), gen(1 + steps)
            compile_s = time.perf_counter() - t
            per = float(np.median([(gen(1 + steps) - gen(1)) / steps for _ in range(3)]))
            roofline = (weight_bytes(m) + rows * kv_row) / bw
            results[name] = rows / per
            add(name, dict(ms_per_step=per * 1e3, tokens_per_s=rows / per, of_roofline=roofline / per,
                           roofline_tokens_per_s=rows / roofline, warmup_s=compile_s,
                           peak_GiB=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30))
        except Exception as e:  # record and go on
            add(f"{name}.error", f"{type(e).__name__}: {str(e)[:400]}")

    generate_row("generate.bf16.batch1", model, 1)
    for mode in args.modes:
        try:
            quantized = jax.block_until_ready(g4.quantize(model, mode))
        except Exception as e:  # record and go on
            add(f"generate.{mode}.batch1.error", f"{type(e).__name__}: {str(e)[:400]}")
            continue
        generate_row(f"generate.{mode}.batch1", quantized, 1)
        del quantized
        if "generate.bf16.batch1" in results and f"generate.{mode}.batch1" in results:
            add(f"generate.{mode}.vs_bf16", results[f"generate.{mode}.batch1"] / results["generate.bf16.batch1"])
    for rows in args.batches:
        generate_row(f"generate.bf16.batch{rows}", model, rows)
    for slots in args.slots:
        try:
            ms = step_cost(model, slots, context + 256)
            add(f"engine.bf16.slots{slots}", dict(ms_per_step=ms, tokens_per_s=slots / ms * 1e3))
        except Exception as e:  # record and go on
            add(f"engine.bf16.slots{slots}.error", f"{type(e).__name__}: {str(e)[:400]}")


if __name__ == "__main__":
    main()
