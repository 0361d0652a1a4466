"""Generation speed: prefill, decode with the KV cache, and decode by recomputing the prefix, per context length.

Runs on CPU with small configs and on GPU with the real 12B shapes (random bf16 weights: speed does not need
real weights).

    .venv/bin/python benchmarks/generation.py --preset small --contexts 128 512 2048
    .venv/bin/python benchmarks/generation.py --numerics invariant --contexts 128 512   # the exact mode's price
    python benchmarks/generation.py --preset 12b --dtype bfloat16 --contexts 1024 8192   # on a GPU

Per context length L it reports: prefill tokens/s and time to first token (a prompt of L tokens, compile time
shown separately), decode tokens/s with the cache filled to L, and (unless --no-recompute) the time of one token
when the whole prefix of L tokens is recomputed instead, i.e. what a cache-free decoder pays per token.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx.model.decode import decode_step, prefill

PRESETS = {
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
                  sliding_window=128, mm_embed_dim=64),
}


def build(preset: str, dtype):
    if preset == "12b":
        cfg = g4.Gemma4Config.gemma4_12b()
    else:
        cfg = g4.small_config(**PRESETS[preset])
    model = g4.Gemma4(cfg, key=jax.random.key(0), dtype=dtype)
    return cfg, model


def timed(fn, *args, repeat: int = 5):
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def peak_memory_gib() -> float:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS on CPU (KiB -> GiB)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=[*PRESETS, "12b"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 2048])
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--no-recompute", action="store_true")
    ap.add_argument("--numerics", default="xla", choices=["xla", "torch_cpu", "invariant"],
                    help="the model's numerics mode (see gemma4_eqx.layers.numerics): what the verification modes cost")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    cfg, model = build(args.preset, dtype)
    model = model.with_numerics(args.numerics)
    dev = jax.devices()[0]
    print(f"machine: {platform.node()}, {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
          f"jax {jax.__version__}; preset {args.preset}, {dtype.name}, numerics {args.numerics}, "
          f"{g4.count_parameters(model):,} parameters")
    header = (f"{'context':>8} {'compile s':>9} {'TTFT s':>8} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'recompute s/tok':>15} {'cache speed-up':>14}")
    print(header)
    prefill_fn = jax.jit(lambda m, ids, c: prefill(m, ids, c), donate_argnums=2)
    step_fn = jax.jit(lambda m, t, c: decode_step(m, t, c), donate_argnums=2)
    recompute_fn = jax.jit(lambda m, ids: m.logits_from_hidden(m.hidden_states(ids)[-1]))
    rng = np.random.default_rng(0)
    for ctx in args.contexts:
        ids = jnp.asarray(rng.integers(3, 1000, ctx), jnp.int32)
        max_len = ctx + args.decode_steps + 1
        t0 = time.perf_counter()
        cache = g4.KVCache.init(cfg, max_len=max_len, dtype=dtype)
        lowered = prefill_fn.lower(model, ids, cache)
        compiled_prefill = lowered.compile()
        compile_s = time.perf_counter() - t0
        ttfts = []
        for _ in range(3):
            cache = g4.KVCache.init(cfg, max_len=max_len, dtype=dtype)
            t0 = time.perf_counter()
            logits, cache = compiled_prefill(model, ids, cache)
            jax.block_until_ready(logits)
            ttfts.append(time.perf_counter() - t0)
        ttft = float(np.median(ttfts))
        token = jnp.argmax(logits).astype(jnp.int32)
        logits, cache = step_fn(model, token, cache)  # compile + warm up
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(args.decode_steps - 1):
            logits, cache = step_fn(model, jnp.argmax(logits).astype(jnp.int32), cache)
        jax.block_until_ready(logits)
        decode_tps = (args.decode_steps - 1) / (time.perf_counter() - t0)
        if args.no_recompute:
            rec, speedup = float("nan"), float("nan")
        else:
            _, rec = timed(recompute_fn, model, ids, repeat=3)
            speedup = rec * decode_tps
        print(f"{ctx:>8} {compile_s:>9.2f} {ttft:>8.3f} {ctx / ttft:>13.0f} {decode_tps:>12.1f} "
              f"{rec:>15.4f} {speedup:>13.1f}x", flush=True)
    print(f"peak memory: {peak_memory_gib():.2f} GiB ({'device' if dev.platform != 'cpu' else 'host RSS'})")


if __name__ == "__main__":
    main()
