"""Quantized weights: decode tokens/s and peak memory for bf16 / int8 / int4 side by side, and the streaming
quantized load's peak host memory.

    .venv/bin/python benchmarks/quant.py                       # CPU, the small preset of benchmarks/generation.py
    .venv/bin/python benchmarks/quant.py --load-hidden 1024    # also: a ~0.4 GB bf16 checkpoint loaded 3 ways

Each mode runs in its own child process (so its peak RSS is its own): a random bf16 model of the preset, quantized
with `g4.quantize`, then `g4.generate` greedy from a fixed prompt; the first call compiles, the second is timed.
Reported: weight bytes (`quant.weight_bytes`), decode tokens/s (new tokens / wall time of the timed call,
prefill included, so short prompts; best of three), peak RSS of the process (VmHWM).
The load part saves one random bf16 checkpoint and loads it in child processes with `g4.load(dtype=bf16)`,
`g4.load(quantize="int8")` and `g4.load(quantize="int4")`, reporting peak RSS above the interpreter's baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx import quant

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, global_head_dim=128, sliding_window=128, mm_embed_dim=64)


def rss_gib() -> float:
    """Peak RSS of this process (VmHWM: per address space; ru_maxrss would carry the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def decode_child(mode: str, prompt_len: int, new: int) -> dict:
    from gemma4_eqx.testing import random_model

    cfg = g4.small_config(**SMALL)
    model = random_model(cfg, dtype=jnp.bfloat16)
    if mode != "bf16":
        model = g4.quantize(model, mode)
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, 4000, prompt_len), jnp.int32)
    g4.generate(model, prompt, max_new_tokens=new, temperature=0.0, stop_ids=())
    dt = float("inf")
    for _ in range(3):  # best of three (a shared machine)
        t = time.perf_counter()
        np.asarray(g4.generate(model, prompt, max_new_tokens=new, temperature=0.0, stop_ids=()))
        dt = min(dt, time.perf_counter() - t)
    return {"mode": mode, "weight_MiB": quant.weight_bytes(model) / 2**20, "tok_s": new / dt,
            "peak_rss_GiB": rss_gib()}


def load_child(folder: str, mode: str) -> dict:
    base = rss_gib()
    t = time.perf_counter()
    m = g4.load(folder, dtype=jnp.bfloat16, quantize=None if mode == "bf16" else mode)
    jax.block_until_ready(jax.tree.leaves(m))
    return {"mode": mode, "seconds": time.perf_counter() - t, "weight_MiB": quant.weight_bytes(m) / 2**20,
            "baseline_GiB": base, "peak_rss_GiB": rss_gib()}


def child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--load-hidden", type=int, default=0, help="hidden size of the load test's checkpoint (0: skip)")
    a = p.parse_args()
    if a.child:
        kind, *rest = json.loads(a.child)
        res = decode_child(rest[0], int(rest[1]), int(rest[2])) if kind == "decode" else load_child(*rest)
        print(json.dumps(res))
        return
    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"decode, small preset ({SMALL['num_hidden_layers']} layers, hidden {SMALL['hidden_size']}), prompt "
          f"{a.prompt}, {a.new} new tokens, greedy")
    print("| weights | weight MiB | decode tok/s | peak RSS GiB |\n|---|---|---|---|")
    for mode in ("bf16", "int8", "int4"):
        r = child(["decode", mode, a.prompt, a.new])
        print(f"| {mode} | {r['weight_MiB']:.1f} | {r['tok_s']:.1f} | {r['peak_rss_GiB']:.3f} |", flush=True)
    if a.load_hidden:
        from gemma4_eqx.testing import random_model

        h = a.load_hidden
        cfg = g4.small_config(vocab_size=32768, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=12,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
                              sliding_window=128, mm_embed_dim=64)
        with tempfile.TemporaryDirectory() as d:
            g4.save(random_model(cfg, dtype=jnp.bfloat16), d)
            print(f"\nload of a bf16 checkpoint (hidden {h}, 12 layers, vocab 32768)")
            print("| load | weight MiB | seconds | peak RSS GiB (baseline) |\n|---|---|---|---|")
            for mode in ("bf16", "int8", "int4"):
                r = child(["load", d, mode])
                print(f"| {mode} | {r['weight_MiB']:.1f} | {r['seconds']:.1f} | {r['peak_rss_GiB']:.3f} "
                      f"({r['baseline_GiB']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
