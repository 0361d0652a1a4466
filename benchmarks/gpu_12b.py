"""One script for a lent GPU: the card's ceilings, attention kernels on the 12B's shapes, 12B prefill and decode.

    PYTHONPATH=. python3 benchmarks/gpu_12b.py --out $OUT            # on the device (real 12B shapes, bf16)
    .venv/bin/python benchmarks/gpu_12b.py --small                   # CPU smoke run of the same code, tiny shapes

Random bf16 weights (speed does not need real ones, but never zeros: see ../.library/device/METHOD.md). Every
section is timed after a warm-up with `block_until_ready`, median of several runs; a failing section is recorded
with its error and the script goes on. Prints a table last and writes everything to `<out>/gpu_12b.json`.

1. Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matrix product 8192^3.
2. Attention on the 12B shapes (16 query heads, scale 1.0), each against our fp32 path on the same inputs
   (relative error ||out - ref|| / ||ref||): our XLA einsum path (`"xla"`: dense, streamed with a running
   softmax as the model runs long calls, and for the sliding shape in bands as the model runs text prefill),
   `jax.nn.dot_product_attention` with
   JAX's XLA implementation, and with cuDNN (dense boolean mask, as the model passes it; and causal + window
   given structurally, which lets cuDNN skip blocks). Prefill S=8192 for the sliding shape (head_dim 256, 8 KV
   heads, window 1024) and the global shape (head_dim 512, 1 KV head, causal); decode 1 query against 1024 and
   32768 keys.
3. The 12B text model with attention implementations "xla" and "auto": prefill 8192 tokens (tokens/s, MFU of
   the useful FLOPs against the datasheet's 989 TFLOP/s and the measured matrix rate), decode tokens/s at batch
   1 with the cache filled to 1024 and 8192 tokens against the bandwidth roofline (weights + KV cache bytes read
   per token / measured copy bandwidth), at 8192 also with K and V cached instead of the global layers' raw keys
   (`raw_keys=False`), compile times, peak device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx.model.cache import cache_bytes
from gemma4_eqx.layers import kernels as attn
from gemma4_eqx.model.masks import causal, inside_window
from gemma4_eqx.testing import random_model

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def bench(fn, *args, repeat: int = 10) -> float:
    """Median seconds of `fn(*args)` after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None


class NoGPU(RuntimeError):
    pass


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str]] = []
        self.data: dict = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                           "jax": jax.__version__}

    log = None  # a file every figure is appended to as soon as it exists (a run cut short keeps them)

    def add(self, key: str, value, shown: str | None = None):
        self.data[key] = value
        self.rows.append((key, shown if shown is not None else str(value)))
        print(f"{key}: {self.rows[-1][1]}", flush=True)
        if self.log is not None:
            self.log.write(json.dumps({"key": key, "value": value, "shown": self.rows[-1][1]}, default=str) + "\n")
            self.log.flush()

    def section(self, name: str, fn):
        try:
            fn()
        except Exception as e:  # record and go on: one failing section must not cost the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            self.add(f"{name}.error", msg)
            if not isinstance(e, NoGPU):
                traceback.print_exc()


def ceilings(r: Report, small: bool):
    n = (1 << 24) if small else (1 << 30)  # bf16 elements: 2 GiB on the GPU
    x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    t = bench(copy, x)
    bw = 2 * x.nbytes / t
    r.add("copy_bandwidth_TBps", bw / 1e12, f"{bw / 1e12:.2f} TB/s ({2 * x.nbytes / 1e9:.1f} GB moved in {t * 1e3:.2f} ms)")
    m = 1024 if small else 8192
    a = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
    t = bench(jax.jit(jnp.matmul), a, b)
    r.add("matmul_bf16_TFLOPs", 2 * m**3 / t / 1e12, f"{2 * m**3 / t / 1e12:.0f} TFLOP/s ({m}^3)")
    return bw, 2 * m**3 / t


def attention_kernels(r: Report, small: bool):
    s_prefill = 512 if small else 8192
    window = 64 if small else 1024
    shapes = {
        "sliding_prefill": dict(t=s_prefill, s=s_prefill, kv=8, hd=256, window=window),
        "global_prefill": dict(t=s_prefill, s=s_prefill, kv=1, hd=512, window=None),
        "sliding_decode": dict(t=1, s=window, kv=8, hd=256, window=None),
        "global_decode": dict(t=1, s=2048 if small else 32768, kv=1, hd=512, window=None),
    }
    for i, (name, sh) in enumerate(shapes.items()):
        ks = jax.random.split(jax.random.key(10 + i), 3)
        q = jax.random.normal(ks[0], (sh["t"], 16, sh["hd"]), jnp.bfloat16)
        k = jax.random.normal(ks[1], (sh["s"], sh["kv"], sh["hd"]), jnp.bfloat16) * 0.1
        v = jax.random.normal(ks[2], (sh["s"], sh["kv"], sh["hd"]), jnp.bfloat16)
        q_slots = jnp.arange(sh["s"] - sh["t"], sh["s"])
        k_slots = jnp.arange(sh["s"])
        mask = causal(q_slots, k_slots)
        if sh["window"]:
            mask = mask & inside_window(q_slots, k_slots, sh["window"])
        ref = np.asarray(jax.jit(attn.dot_product_attention)(q.astype(jnp.float32), k.astype(jnp.float32),
                                                             v.astype(jnp.float32), mask), np.float64)

        def rel(out):
            out = np.asarray(out.astype(jnp.float32), np.float64)
            return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

        structured = dict(is_causal=True)
        if sh["window"]:
            structured["local_window_size"] = (sh["window"] - 1, 0)
        variants = {
            "ours_xla": jax.jit(attn.dot_product_attention),
            "jax_xla": jax.jit(lambda q, k, v, m: attn.fused_attention(q, k, v, m, implementation="xla")),
            "cudnn_mask": jax.jit(lambda q, k, v, m: attn.fused_attention(q, k, v, m, implementation="cudnn")),
        }
        if sh["t"] > 1:
            variants["ours_streamed"] = jax.jit(attn.streamed_attention)
        if sh["window"]:
            variants["ours_banded"] = jax.jit(lambda q, k, v, m: attn.banded_attention(q, k, v, m, sh["window"]))
        if sh["t"] == sh["s"]:
            variants["cudnn_structured"] = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
                q[None], k[None], v[None], scale=1.0, implementation="cudnn", **structured)[0])
        for vname, fn in variants.items():
            def run(fn=fn, vname=vname):
                if vname.startswith("cudnn") and jax.default_backend() != "gpu":
                    raise NoGPU("cuDNN needs a GPU backend")
                out = fn(q, k, v, mask)
                err = rel(out)
                t = bench(fn, q, k, v, mask, repeat=20)
                r.add(f"attn.{name}.{vname}", dict(ms=t * 1e3, rel_err=err), f"{t * 1e3:.3f} ms, rel err {err:.1e}")
            r.section(f"attn.{name}.{vname}", run)


def text_config(small: bool):
    if small:
        return g4.small_config(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                               head_dim=64, global_head_dim=128, sliding_window=64, vision=False, audio=False)
    cfg = g4.Gemma4Config.gemma4_12b()
    return cfg


def useful_prefill_flops(cfg, n_linear: int, t: int) -> float:
    """2 * T * (linear weights) + QK^T and PV over the keys each query may see (causal, window)."""
    tc = cfg.text
    flops = 2.0 * t * n_linear
    for layer_type in tc.layer_types:
        g = tc.layer_geometry_for_type(layer_type)
        q = np.arange(t) + 1
        seen = np.minimum(q, tc.sliding_window) if layer_type == "sliding_attention" else q
        flops += 2 * 2 * tc.num_attention_heads * g.head_dim * float(seen.sum())
    return flops + 2 * tc.hidden_size * tc.vocab_size  # logits of the last token


def random_on_device(cfg, dtype):
    """The model built abstractly, every array drawn on the device by one jitted program per leaf shape: no
    eager per-op initialisation of 12 B parameters. Norm weights and scalars near 1, matrices ~N(0, 0.02^2)."""
    import equinox as eqx

    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0), dtype=dtype))
    draw = jax.jit(lambda key, near_one, shape, dtype: (jax.random.normal(key, shape, jnp.float32)
                                                        * (0.05 if near_one else 0.02) + near_one).astype(dtype),
                   static_argnums=(1, 2, 3))
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    filled = [draw(k, float(any(w in jax.tree_util.keystr(p) for w in ("norm", "scalar"))), x.shape, x.dtype)
              if isinstance(x, jax.ShapeDtypeStruct) else x for k, (p, x) in zip(keys, leaves)]
    return jax.tree.unflatten(jax.tree.structure(abstract), filled)


def model_runs(r: Report, small: bool, bw: float, matmul_rate: float):
    cfg = text_config(small)
    t0 = time.perf_counter()
    model = random_model(cfg, dtype=jnp.bfloat16) if small else random_on_device(cfg, jnp.bfloat16)
    jax.block_until_ready(model)
    r.add("model.init_s", time.perf_counter() - t0, f"{time.perf_counter() - t0:.1f} s")
    leaves = jax.tree_util.tree_leaves_with_path(model.layers)
    n_linear = sum(x.size for p, x in leaves if "_proj" in jax.tree_util.keystr(p))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.layers)) + model.embed_tokens.nbytes + model.norm.weight.nbytes
    r.add("model.decoder_and_embedding_GB", weight_bytes / 1e9, f"{weight_bytes / 1e9:.2f} GB read per decoded token")
    prompt_len = 512 if small else 8192
    ids = jax.random.randint(jax.random.key(5), (prompt_len,), 0, cfg.text.vocab_size - 16, jnp.int32)
    flops = useful_prefill_flops(cfg, n_linear, prompt_len)
    for impl in ("xla", "auto"):
        m = model.with_attention_implementation(impl)

        def prefill_run(m=m, impl=impl):
            cache0 = g4.KVCache.init(cfg, max_len=prompt_len + 64, dtype=jnp.bfloat16)
            t0 = time.perf_counter()
            logits, cache = m.prefill(ids, cache0)
            jax.block_until_ready(logits)
            r.add(f"prefill.{impl}.first_call_s", time.perf_counter() - t0,
                  f"{time.perf_counter() - t0:.1f} s (compile + run)")
            times = []
            for _ in range(3):
                c = g4.KVCache.init(cfg, max_len=prompt_len + 64, dtype=jnp.bfloat16)
                jax.block_until_ready(c)
                t1 = time.perf_counter()
                logits, cache = m.prefill(ids, c)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - t1)
            t = float(np.median(times))
            rate = flops / t
            r.add(f"prefill.{impl}.{prompt_len}", dict(s=t, tokens_per_s=prompt_len / t, tflops=rate / 1e12,
                                                       mfu_datasheet=rate / (DATASHEET_BF16_TFLOPS * 1e12),
                                                       of_matmul_rate=rate / matmul_rate),
                  f"{t * 1e3:.0f} ms, {prompt_len / t:,.0f} tok/s, {rate / 1e12:.0f} TFLOP/s useful = "
                  f"{100 * rate / (DATASHEET_BF16_TFLOPS * 1e12):.0f}% MFU (datasheet), "
                  f"{100 * rate / matmul_rate:.0f}% of the measured matmul rate")
            if impl == "xla":
                decode(r, m, cfg, ids, weight_bytes, bw)
        r.section(f"prefill.{impl}", prefill_run)
    r.add("peak_device_memory_GiB", peak_gib())


def decode(r: Report, m, cfg, ids, weight_bytes: float, bw: float):
    steps = 32
    longest = ids.shape[0]
    runs = [(c, True) for c in sorted({min(1024, longest), longest})] + [(longest, False)]
    for context, raw_keys in runs:
        name = f"decode.{context}" + ("" if raw_keys else ".k_and_v_cache")
        cache = g4.KVCache.init(cfg, max_len=context + steps + 1, dtype=jnp.bfloat16, raw_keys=raw_keys)
        logits, cache = m.prefill(ids[:context], cache)
        token = jnp.argmax(logits).astype(jnp.int32)
        t0 = time.perf_counter()
        logits, cache = m.decode_step(token, cache)
        jax.block_until_ready(logits)
        r.add(f"{name}.compile_and_first_s", time.perf_counter() - t0, f"{time.perf_counter() - t0:.1f} s")
        t1 = time.perf_counter()
        for _ in range(steps):
            logits, cache = m.decode_step(jnp.argmax(logits).astype(jnp.int32), cache)
        jax.block_until_ready(logits)
        per_token = (time.perf_counter() - t1) / steps
        kv_bytes = cache_bytes(cfg, context, jnp.bfloat16, raw_keys=raw_keys)
        roofline = (weight_bytes + kv_bytes) / bw
        r.add(name, dict(ms_per_token=per_token * 1e3, tokens_per_s=1 / per_token,
                         roofline_tokens_per_s=1 / roofline, of_roofline=roofline / per_token),
              f"{per_token * 1e3:.2f} ms/token = {1 / per_token:.1f} tok/s; roofline {1 / roofline:.1f} tok/s "
              f"({(weight_bytes + kv_bytes) / 1e9:.1f} GB / {bw / 1e12:.2f} TB/s): {100 * roofline / per_token:.0f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", nargs="*", default=[], choices=["ceilings", "attention", "model"])
    args = ap.parse_args()
    r = Report()
    os.makedirs(args.out, exist_ok=True)
    r.log = open(os.path.join(args.out, "gpu_12b.jsonl"), "a")
    bw, rate = 3.0e12, DATASHEET_BF16_TFLOPS * 1e12
    if "ceilings" not in args.skip:
        bw, rate = ceilings(r, args.small)
    if "model" not in args.skip:  # the model first: a run cut short keeps the figures that matter most
        model_runs(r, args.small, bw, rate)
    if "attention" not in args.skip:
        attention_kernels(r, args.small)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_12b.json"), "w") as f:
        json.dump(r.data, f, indent=1, default=str)
    print("\n| measure | figure |\n|---|---|")
    for key, shown in r.rows:
        print(f"| {key} | {shown} |")


if __name__ == "__main__":
    main()
