"""What GEMMA4_EQX_TYPECHECK=1 costs on the bundled tiny model, checks off and on.

    PYTHONPATH=. .venv/bin/python benchmarks/typecheck_cost.py [--tokens 32] [--calls 20]

Each setting runs in its own interpreter (the switch acts at import). The checks are Python code run at every
call of an annotated function, so they cost where Python runs:
- `trace_s`: tracing the whole forward pass (`jax.jit(f).trace(ids)`, a new function each time): every layer,
  norm, attention and mask function called once with its checks; this is what eager code pays per forward on
  top of the kernels, and what `jax.jit` pays once per shape;
- `eager_head_s`: one eager call of a small annotated function (`model.logits_from_hidden` on `[tokens, 64]`);
- `jit_s`: one compiled call (no Python of the package runs, so the checks cost nothing).
Best of `--calls` repeats (the machine is shared: the minimum is the least disturbed). An eager call of the
whole model is not timed: its `lax.scan` over layers re-traces and compiles at every eager call, seconds that
hide everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import gemma4_eqx as g4
tokens, calls = int(sys.argv[1]), int(sys.argv[2])
model = g4.load(g4.assets.TINY_CHECKPOINT)
ids = jnp.arange(tokens, dtype=jnp.int32) + 10
h = jnp.ones((tokens, model.config.text.hidden_size))

def median_seconds(fn):
    jax.block_until_ready(fn())
    times = []
    for _ in range(calls):
        t = time.perf_counter(); jax.block_until_ready(fn()); times.append(time.perf_counter() - t)
    return min(times)

jitted = jax.jit(lambda ids: model(ids))
print(json.dumps({"checks": g4.typecheck.enabled(),
                  "trace_s": median_seconds(lambda: jax.jit(lambda ids: model(ids)).trace(ids) and None),
                  "eager_head_s": median_seconds(lambda: model.logits_from_hidden(h)),
                  "jit_s": median_seconds(lambda: jitted(ids))}))
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
    print(f"{platform.node()}: tiny model, {args.tokens} tokens, best of {args.calls} calls")
    for what in ("trace_s", "eager_head_s", "jit_s"):
        print(f"  {what:17s} off {off[what] * 1e3:8.2f} ms   on {on[what] * 1e3:8.2f} ms   x{on[what] / off[what]:.2f}")


if __name__ == "__main__":
    main()
