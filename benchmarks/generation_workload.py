"""A chat/evaluation-like workload of `g4.generate` calls: wall time, compilations, time to first token.

Twenty calls on the bundled checkpoint (`g4.assets.TINY_CHECKPOINT`, 577K parameters): prompt lengths 10-300,
1-64 new tokens, greedy and sampled with varying temperature / top-k / top-p, four of them a left-padded batch
of 4. The same calls run through the current `gemma4_eqx.generation` (`--impl new`) or through the
`generation.py` of an earlier commit loaded as a throw-away module (`--impl old --old-rev b9aff90`), so the
"before" figure needs no checkout.

    .venv/bin/python benchmarks/generation_workload.py --impl old
    .venv/bin/python benchmarks/generation_workload.py --impl new

Reports the workload's wall time (first call included: it compiles), the number of XLA compilations after the
first call, and the time to first token of a warmed-up prompt (a length not seen before in the same bucket).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
STOP, SUPPRESS = (1, 106, 50), (1022, 1021)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workload(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(20):
        length = int(rng.integers(10, 301))
        batch = 4 if i % 5 == 4 else None
        greedy = i % 3 == 0
        call = dict(length=length, batch=batch, max_new_tokens=int(rng.integers(1, 65)), seed=i,
                    temperature=0.0 if greedy else float(rng.choice([0.7, 1.0, 1.3])),
                    top_k=int(rng.choice([0, 20, 64])), top_p=float(rng.choice([0.8, 0.95, 1.0])))
        calls.append(call)
    return calls


def inputs(call: dict):
    rng = np.random.default_rng(call["seed"])
    if call["batch"] is None:
        return rng.integers(3, 1000, call["length"]).astype(np.int32), {}
    ids = rng.integers(3, 1000, (call["batch"], call["length"])).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    for b in range(call["batch"]):
        pad = int(rng.integers(0, call["length"] // 2))
        mask[b, :pad] = False
        ids[b, :pad] = 0
    return ids, {"attention_mask": mask}  # numpy: a jnp conversion would compile per shape on the caller's side


def load_old(rev: str):
    """`gemma4_eqx/generation.py` as of `rev`, imported as a module of the package (its relative imports work)."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:gemma4_eqx/generation.py"], check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "_generation_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("gemma4_eqx._generation_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["new", "old"], default="new")
    ap.add_argument("--old-rev", default="b9aff90", help="the commit whose generation.py is 'old'")
    args = ap.parse_args()
    generate = g4.generate if args.impl == "new" else load_old(args.old_rev)
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(duration) if event == BACKEND_COMPILE_EVENT else None)
    dev = jax.devices()[0]
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, {dev.platform}, jax {jax.__version__}; "
          f"impl {args.impl}; load average {os.getloadavg()[0]:.2f}")
    calls = workload()
    t0 = time.perf_counter()
    after_first = None
    for i, call in enumerate(calls):
        ids, extra = inputs(call)
        t1 = time.perf_counter()
        out = generate(model, ids, max_new_tokens=call["max_new_tokens"], key=jax.random.key(call["seed"]),
                       temperature=call["temperature"], top_k=call["top_k"] or None, top_p=call["top_p"],
                       stop_ids=STOP, suppress_ids=SUPPRESS, **extra)
        jax.block_until_ready(out)
        if i == 0:
            after_first = len(compiles)
        print(f"  call {i:2d}: prompt {call['length']:3d} x {call['batch'] or 1}, {call['max_new_tokens']:2d} new, "
              f"T={call['temperature']:.1f} k={call['top_k']} p={call['top_p']}: {time.perf_counter() - t1:6.2f} s, "
              f"{len(compiles)} compilations so far", flush=True)
    total = time.perf_counter() - t0
    # time to first token, warmed up: a prompt length not used above, through a streamer
    ttfts = []
    for length in (101, 117, 123):
        ids = np.random.default_rng(length).integers(3, 1000, length).astype(np.int32)
        t1 = time.perf_counter()
        first = []

        def stream(tokens):
            if not first:
                first.append(time.perf_counter() - t1)

        generate(model, ids, max_new_tokens=8, temperature=0.0, stop_ids=(), suppress_ids=SUPPRESS, streamer=stream)
        ttfts.append(first[0])
    print(f"workload: {len(calls)} calls in {total:.1f} s; {len(compiles) - after_first} compilations after the "
          f"first call ({after_first} in it); time to first token (prompt 101-123, warmed up): "
          f"{ttfts[0]:.3f} s first length, median of three {float(np.median(ttfts)):.3f} s")


if __name__ == "__main__":
    main()
