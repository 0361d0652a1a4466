"""12B decode on a GPU with `g4.serving_layout` (every layer in its own arrays, the layer loop unrolled), against
the stored (scanned) layout in the same run: batch 1, 1,024 tokens of context, random bf16 weights.

    PYTHONPATH=. python3 benchmarks/gpu_serving_decode.py --out $OUT       # on the device
    .venv/bin/python benchmarks/gpu_serving_decode.py --small              # CPU smoke run, small shapes

Per layout: `model.decode_step` called from Python 32 times after a compile step (ms/token, as
`benchmarks/gpu_12b.py` measures decode), then `g4.generate` timed as the difference of 33 and 1 new tokens over 32
(the compiled decode loop, as a user runs it). Each figure is appended to `<out>/gpu_serving_decode.jsonl` as it
comes, so a run cut short keeps what it measured.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_12b import random_on_device, text_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "gpu_serving_decode.jsonl"), "a")

    def add(key, value):
        log.write(json.dumps({"key": key, "value": value}) + "\n")
        log.flush()
        print(f"{key}: {value}", flush=True)

    cfg = text_config(args.small)
    t0 = time.perf_counter()
    stored = random_on_device(cfg, jnp.bfloat16)
    jax.block_until_ready(stored)
    add("device", dict(kind=jax.devices()[0].device_kind, jax=jax.__version__, init_s=time.perf_counter() - t0))
    context, steps = (256 if args.small else args.context), 32
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.text.vocab_size - 16, context), jnp.int32)
    for name, model in (("serving", g4.serving_layout(stored)), ("stored", stored)):
        try:
            cache = g4.KVCache.init(cfg, max_len=context + steps + 1, dtype=jnp.bfloat16, raw_keys=False)
            t0 = time.perf_counter()
            logits, cache = model.prefill(ids, cache)
            token = jnp.argmax(logits).astype(jnp.int32)
            logits, cache = model.decode_step(token, cache)
            jax.block_until_ready(logits)
            add(f"{name}.decode_step.compile_s", time.perf_counter() - t0)
            t1 = time.perf_counter()
            for _ in range(steps):
                logits, cache = model.decode_step(jnp.argmax(logits).astype(jnp.int32), cache)
            jax.block_until_ready(logits)
            add(f"{name}.decode_step.ms_per_token", (time.perf_counter() - t1) / steps * 1e3)

            def gen(new):
                t = time.perf_counter()
                np.asarray(g4.generate(model, ids, max_new_tokens=new, temperature=0.0, stop_ids=(),
                                       cache_raw_keys=False))
                return time.perf_counter() - t

            t0 = time.perf_counter()
            gen(1), gen(1 + steps)
            add(f"{name}.generate.compile_s", time.perf_counter() - t0)
            per = float(np.median([(gen(1 + steps) - gen(1)) / steps for _ in range(3)]))
            add(f"{name}.generate.ms_per_token", per * 1e3)
        except Exception as e:  # record and go on
            add(f"{name}.error", f"{type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
