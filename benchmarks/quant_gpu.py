"""Quantized weights on a GPU: the 12B shapes (random weights) decoding at batch 1 in bf16 / int8 / int4, and what
XLA makes of the in-jit dequantization there.

    PYTHONPATH=. python3 benchmarks/quant_gpu.py --out $OUT       # on the device
    .venv/bin/python benchmarks/quant_gpu.py --small              # CPU smoke run, tiny shapes

Random bf16 weights from the model's own initialiser (never zeros), quantized on the device with `g4.quantize`.
Per mode: weight bytes, prefill of `--context` tokens into a cache, then `--steps` decode steps timed one by one
(`block_until_ready`; median), tokens/s and the bandwidth roofline (weight bytes per token / the measured
device-to-device copy rate), peak device memory. For int4 and int8 it also records, from the compiled decode
program how the matmuls read the int4/int8 weights (the full HLO is written too). `--dequantize-first` runs the
pre-change path (every call dequantizes, then multiplies) for comparison. Writes `<out>/quant_gpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx import quant


def copy_rate() -> float:
    x = jnp.ones((2**30,), jnp.uint8)  # 1 GiB
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / min(ts)


def hlo_summary(text: str) -> dict:
    """How the compiled decode program multiplies by quantized weights."""
    lines = text.splitlines()
    gemm_fusions = [l for l in lines if "fusion(" in l and ("__triton_gemm" in l or "kCustom" in l)]
    s4_gemm = [l for l in gemm_fusions if "s4[" in l]
    s8_gemm = [l for l in gemm_fusions if "s8[" in l]
    # a fusion that outputs a large bf16 matrix from an s4/s8 operand = a materialised dequantized weight
    materialised = [l for l in lines if re.search(r"= bf16\[\d{4,},\d{4,}\]", l) and ("s4[" in l or "s8[" in l)]
    cublas = [l for l in lines if "custom-call" in l and "cublas" in l]
    return {"cublas_calls": len(cublas), "gemm_fusions": len(gemm_fusions), "gemm_fusions_with_s4_operand": len(s4_gemm),
            "gemm_fusions_with_s8_operand": len(s8_gemm), "materialised_dequant_fusions": len(materialised),
            "examples": (s4_gemm or s8_gemm or materialised or gemm_fusions)[:3]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dequantize-first", action="store_true",
                   help="decode through dequantize-then-matmul (quant.GROUPED_MAX_ROWS = 0), the pre-change path")
    p.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"])
    a = p.parse_args()
    if a.dequantize_first:
        quant.GROUPED_MAX_ROWS = 0
    if a.small:
        cfg = g4.small_config(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                              sliding_window=32, mm_embed_dim=32)
        a.context, a.steps = 64, 4
    else:
        cfg = g4.Gemma4Config.gemma4_12b()
    dev = jax.devices()[0]
    results: dict = {"device": str(dev), "jax": jax.__version__, "context": a.context, "modes": {}}
    results["copy_rate_GBps"] = copy_rate() / 1e9
    print(f"{dev}: copy {results['copy_rate_GBps']:.0f} GB/s", flush=True)
    t = time.perf_counter()
    base = jax.block_until_ready(g4.Gemma4(cfg, key=jax.random.key(0), dtype=jnp.bfloat16))
    results["build_s"] = time.perf_counter() - t
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.text.vocab_size - 300, a.context), jnp.int32)
    results["dequantize_first"] = a.dequantize_first
    for mode in a.modes:
        r: dict = {}
        try:
            m = base if mode == "bf16" else jax.block_until_ready(g4.quantize(base, mode))
            r["weight_GiB"] = quant.weight_bytes(m) / 2**30
            cache = g4.KVCache.init(cfg, max_len=a.context + a.steps + 64, dtype=jnp.bfloat16)
            t = time.perf_counter()
            logits, cache = m.prefill(prompt, cache)
            logits.block_until_ready()
            r["prefill_first_call_s"] = time.perf_counter() - t
            tok = jnp.argmax(logits).astype(jnp.int32)
            t = time.perf_counter()
            logits, cache = m.decode_step(tok, cache)
            logits.block_until_ready()
            r["decode_first_call_s"] = time.perf_counter() - t
            times = []
            for _ in range(a.steps):
                tok = jnp.argmax(logits).astype(jnp.int32)
                t = time.perf_counter()
                logits, cache = m.decode_step(tok, cache)
                logits.block_until_ready()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            r["decode_step_ms"] = 1e3 * med
            r["decode_tok_s"] = 1 / med
            r["roofline_tok_s"] = results["copy_rate_GBps"] * 1e9 / quant.weight_bytes(m)
            stats = dev.memory_stats() or {}
            r["peak_device_GiB"] = stats.get("peak_bytes_in_use", 0) / 2**30
            if mode != "bf16":
                from gemma4_eqx.model.decode import decode_step_jitted

                compiled = jax.jit(lambda mm, tk, c: decode_step_jitted(mm, tk, c)).lower(m, tok, cache).compile()
                text = compiled.as_text()
                r["hlo"] = hlo_summary(text)
                import gzip

                tag = "_dequantize_first" if a.dequantize_first else ""
                with gzip.open(os.path.join(a.out, f"decode_{mode}{tag}.hlo.txt.gz"), "wt") as f:
                    f.write(text)
                del compiled
            if mode != "bf16":
                del m
        except Exception as e:  # record and go on
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
        results["modes"][mode] = r
        print(mode, json.dumps({k: v for k, v in r.items() if k != "hlo"}), flush=True)
        if "hlo" in r:
            print("  hlo", json.dumps(r["hlo"])[:1500], flush=True)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "quant_gpu" + ("_dequantize_first" if a.dequantize_first else "") + ".json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
