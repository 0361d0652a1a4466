"""What GEMMA4_EQX_TYPECHECK=1 costs: the bundled tiny model's forward pass, eager and jitted, checks off and on.

    PYTHONPATH=. .venv/bin/python benchmarks/typecheck_cost.py [--tokens 32] [--calls 20]

Each setting runs in its own interpreter (the switch acts at import). Eager: the median wall time of one
`model(ids)` call, the checks running in Python at every annotated function. Jitted: the median of one compiled
call (the checks run only while tracing) and the first call, which traces and compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
import gemma4_eqx as g4
tokens, calls = int(sys.argv[1]), int(sys.argv[2])
model = g4.load(g4.assets.TINY_CHECKPOINT)
ids = jnp.arange(tokens, dtype=jnp.int32) + 10

def median_seconds(fn):
    fn(ids).block_until_ready()
    times = []
    for _ in range(calls):
        t = time.perf_counter(); fn(ids).block_until_ready(); times.append(time.perf_counter() - t)
    return statistics.median(times)

jitted = jax.jit(lambda ids: model(ids))
t = time.perf_counter(); jitted(ids).block_until_ready(); first = time.perf_counter() - t
print(json.dumps({"checks": g4.typecheck.enabled(), "eager_s": median_seconds(lambda ids: model(ids)),
                  "jit_s": median_seconds(jitted), "jit_first_call_s": first}))
"""


def run(checks: bool, tokens: int, calls: int) -> dict:
    env = dict(os.environ, GEMMA4_EQX_TYPECHECK="1" if checks else "0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tokens), str(calls)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    off, on = run(False, args.tokens, args.calls), run(True, args.tokens, args.calls)
    assert not off["checks"] and on["checks"]
    print(f"{platform.node()}: tiny model, {args.tokens} tokens, median of {args.calls} calls")
    for what in ("eager_s", "jit_s", "jit_first_call_s"):
        print(f"  {what:17s} off {off[what] * 1e3:8.2f} ms   on {on[what] * 1e3:8.2f} ms   x{on[what] / off[what]:.2f}")


if __name__ == "__main__":
    main()
