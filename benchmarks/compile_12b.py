"""Lowering + compile time of the real 12B forward from ShapeDtypeStructs (no weights materialised).

Compares the scanned decoder stack (the default) with the fully unrolled alternative (`unroll=True`).
Run: .venv/bin/python benchmarks/compile_12b.py [--seq 128] [--dtype bfloat16] [--variants scan unroll]
"""

import argparse
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import gemma4_eqx as g4


def measure(unroll: bool, seq: int, dtype) -> dict:
    cfg = g4.Gemma4Config.gemma4_12b()
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0), dtype=dtype, unroll=unroll))
    params, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    @jax.jit
    def forward(params, ids):
        return eqx.combine(params, static)(ids)

    ids = jax.ShapeDtypeStruct((seq,), jnp.int32)
    t0 = time.perf_counter()
    lowered = forward.lower(params, ids)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo_lines = lowered.as_text().count("\n")
    del compiled
    return {"variant": "unroll" if unroll else "scan", "lower_s": t1 - t0, "compile_s": t2 - t1,
            "total_s": t2 - t0, "stablehlo_lines": hlo_lines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", nargs="*", default=["scan", "unroll"])
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"12B forward, seq {args.seq}, {dtype.name}")
    print(f"{'variant':<8} {'lower s':>8} {'compile s':>10} {'total s':>8} {'HLO lines':>10}")
    for v in args.variants:
        r = measure(v == "unroll", args.seq, dtype)
        print(f"{r['variant']:<8} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} {r['total_s']:>8.2f} "
              f"{r['stablehlo_lines']:>10}", flush=True)


if __name__ == "__main__":
    main()
