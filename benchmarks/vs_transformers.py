"""gemma4-eqx against transformers on the same CPU, measured alternately in one run.

    .venv/bin/python benchmarks/vs_transformers.py                       # both presets, five alternating runs
    .venv/bin/python benchmarks/vs_transformers.py --preset 65m --runs 3 --hf-python /work/venv-hf/bin/python

Ours runs in this process (the package's venv) through the public API: `model.prefill` for the prefill rows and
`g4.generate` for the decode and end-to-end rows. transformers runs in a worker process started from its own venv
(`--hf-python`, default `.venv-hf/bin/python` at the repository root, else `/work/venv-hf/bin/python`) that stays
alive for the whole run and is driven over its stdin/stdout with one JSON line per request. Both load the same
checkpoint folder: for `small`, the bundled trained checkpoint (`g4.assets.SMALL_CHECKPOINT`); for `65m`, a random
checkpoint with the real structure (vocab 32768, hidden 512, 12 layers = 2 x [5 sliding + 1 full], window 256),
written once by `g4.save` into `--workdir` and reused.

Ours runs as served: `g4.load(folder, layout="serving")` (every decoder layer in its own arrays, what the CLI, chat
and server load; `--layout stock` for the stored layout) and `g4.generate(..., cache_raw_keys=False)` (finished K and V for the global layers, as
transformers caches them; `--raw-keys` for the default raw-key cache). Both sides run in fp32; torch gets `--threads` threads (default 2) and `attn_implementation="sdpa"`. Every
measurement is taken `--runs` times (default 5), ours and theirs alternating row by row, so the machine's noise
hits both; the table shows medians. Each side's first call of a row is a warm-up: its extra time over the
median is reported as compile time (XLA compilation for ours; torch has none to speak of).

Rows:
- prefill, N-token prompt: one call that writes the prompt into a fresh cache and returns the last token's
  logits (`model.prefill(ids, KVCache.init(...))`; transformers `model(ids, use_cache=True, logits_to_keep=1)`).
- decode at context C: greedy `generate` of 1 and of `1 + --decode-tokens` new tokens after a C-token prompt, no
  stop ids, back to back; tokens/s = decode_tokens / (median over the runs of the two calls' difference). Prefill
  and first token cancel out.
- generate 32: the wall time of one greedy `generate` call of 32 new tokens after a 64-token prompt (prefill,
  decode, everything), reported as new tokens/s.

The read-bandwidth limit of a decode row: the bytes one step must read (every decoder weight, the tied table of the lm
head, each layer's keys and values at the row's mean context) against the bandwidth a jitted sum over 512 MiB reads
at, measured at the start of the run.

XLA flags: unless `--no-xla-flags`, the script sets `XLA_FLAGS` (before JAX starts) to `XLA_CPU_FLAGS` below; the
library itself never sets them. What each flag buys is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# See benchmarks/RESULTS.md ("gemma4-eqx vs transformers") for each flag's measured effect.
XLA_CPU_FLAGS: tuple[str, ...] = ()

PRESET_65M = dict(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=128, global_head_dim=256,
                  sliding_window=256, mm_embed_dim=64, vision=False, audio=False)


# ---- the transformers worker (runs in the reference venv; imports nothing from this package) --------------------
def worker(threads: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText  # noqa: F401  (registers the auto classes)
    from transformers.models.gemma4_unified import modeling_gemma4_unified as mg

    torch.set_num_threads(threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything transformers prints must not corrupt the protocol
    model = None

    def reply(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    reply(ready=True, torch=torch.__version__, threads=torch.get_num_threads())
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "load":
                model = mg.Gemma4UnifiedForConditionalGeneration.from_pretrained(
                    req["folder"], dtype=torch.float32, attn_implementation="sdpa").eval()
                gc = model.generation_config
                gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
                gc.temperature, gc.top_k, gc.top_p = None, None, None
                import transformers
                reply(ok=True, transformers=transformers.__version__)
            elif op == "prefill":
                ids = torch.tensor([req["ids"]])
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
                    dt = time.perf_counter() - t0
                reply(t=dt, argmax=int(logits[0, -1].argmax()))
            elif op == "generate":
                ids = torch.tensor([req["ids"]])
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["new"],
                                         min_new_tokens=req["new"], do_sample=False)
                    dt = time.perf_counter() - t0
                reply(t=dt, tokens=new[0, ids.shape[1]:].tolist())
            elif op == "quit":
                reply(ok=True)
                return
            else:
                reply(error=f"unknown op {op!r}")
        except Exception as e:  # report, keep serving
            reply(error=f"{type(e).__name__}: {e}")


class HFWorker:
    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, __file__, "--worker", "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, cwd=str(ROOT))
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the transformers worker exited (see its stderr above)")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"transformers worker: {msg['error']}")
        return msg

    def __call__(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self(op="quit")
        finally:
            self.proc.wait(timeout=30)


# ---- ours ---------------------------------------------------------------------------------------------------
def read_bandwidth(jax, jnp, np, nbytes: int = 512 << 20, runs: int = 7) -> float:
    """Bytes per second a jitted reduction reads from memory (the decode steps' bound: they read every weight)."""
    x = jax.block_until_ready(jnp.ones((nbytes // 4,), jnp.float32))
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--preset", choices=["small", "65m", "all"], default="all")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128, help="decode steps timed per decode row")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--decode", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--generate", type=int, default=32, help="new tokens of the end-to-end row (0: skip)")
    ap.add_argument("--workdir", default="/tmp/g4-vs-transformers")
    ap.add_argument("--hf-python", default=None)
    ap.add_argument("--no-xla-flags", action="store_true")
    ap.add_argument("--layout", choices=["serving", "stock"], default="serving",
                    help="ours with `g4.serving_layout` (default) or the stored layout")
    ap.add_argument("--raw-keys", action="store_true",
                    help="generate with the keys-as-values layers' raw-key cache (`cache_raw_keys=True`, half their "
                         "cache bytes, re-normalised and re-rotated every step); default K and V, as transformers")
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    args = ap.parse_args()
    if args.worker:
        return worker(args.threads)

    if not args.no_xla_flags and XLA_CPU_FLAGS:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *XLA_CPU_FLAGS]).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gemma4_eqx as g4
    from gemma4_eqx.testing import random_model

    hf_python = args.hf_python or next((str(p) for p in (ROOT / ".venv-hf/bin/python", Path("/work/venv-hf/bin/python"))
                                        if p.exists()), None)
    if hf_python is None:
        raise SystemExit("--hf-python: no reference venv found (.venv-hf at the repository root; see DEVELOPERS.md)")

    def folder_for(preset: str) -> Path:
        if preset == "small":
            return Path(g4.assets.SMALL_CHECKPOINT)
        folder = Path(args.workdir) / preset
        if not (folder / "config.json").exists():
            cfg = g4.small_config(**PRESET_65M)
            g4.save(random_model(cfg, seed=0), folder)
        return folder

    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), load before: {os.getloadavg()}; jax {jax.__version__}"
          f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    bandwidth = read_bandwidth(jax, jnp, np)
    print(f"memory read bandwidth (a jitted sum over 512 MiB of fp32, median of 7): {bandwidth / 1e9:.2f} GB/s",
          flush=True)
    hf = HFWorker(hf_python, args.threads)
    print(f"transformers worker: torch {hf.info['torch']}, {hf.info['threads']} threads", flush=True)
    presets = ["small", "65m"] if args.preset == "all" else [args.preset]
    tables, raw = [], {}
    try:
        for preset in presets:
            folder = folder_for(preset)
            # the README's path: g4.load(..., layout="serving") is what the CLI, chat and server use
            model = g4.load(folder, dtype=jnp.float32, layout="serving" if args.layout == "serving" else "stored")
            cfg = model.config
            info = hf(op="load", folder=str(folder))
            n_params = g4.count_parameters(model)
            print(f"\n{preset}: {folder} ({n_params / 1e6:.1f} M parameters), transformers {info['transformers']}; "
                  f"ours: layout {args.layout}, raw keys {args.raw_keys}",
                  flush=True)
            rng = np.random.default_rng(0)
            vocab = cfg.text.vocab_size
            special = set(cfg.placeholder_ids) | {cfg.text.pad_token_id}
            def prompt(n):  # ordinary text ids: no placeholder, pad or special id
                ids = rng.integers(3, vocab - 8, size=n)
                return [5 if int(i) in special else int(i) for i in ids]

            def ours_prefill(ids):
                arr = jax.device_put(np.asarray(ids, np.int32))
                cache = g4.KVCache.init(cfg, max_len=len(ids), dtype=jnp.float32)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                logits, cache = model.prefill(arr, cache)
                jax.block_until_ready(logits)
                return time.perf_counter() - t0

            def ours_generate(ids, new):
                arr = np.asarray(ids, np.int32)
                t0 = time.perf_counter()
                out = g4.generate(model, arr, max_new_tokens=new, temperature=0.0, stop_ids=(),
                                  cache_raw_keys=args.raw_keys)
                np.asarray(out)
                return time.perf_counter() - t0

            rows = []  # (label, unit, ours_fn, theirs_fn, work) ; value = work / time
            for n in args.prefill:
                ids = prompt(n)
                rows.append((f"prefill, {n:,}-token prompt", lambda ids=ids: ours_prefill(ids),
                             lambda ids=ids: hf(op="prefill", ids=ids)["t"], n, None))
            for c in args.decode:
                ids = prompt(c)
                k = args.decode_tokens
                rows.append((f"greedy decode after a {c:,}-token prompt",
                             (lambda ids=ids: ours_generate(ids, 1), lambda ids=ids, k=k: ours_generate(ids, 1 + k)),
                             (lambda ids=ids: hf(op="generate", ids=ids, new=1)["t"],
                              lambda ids=ids, k=k: hf(op="generate", ids=ids, new=1 + k)["t"]), k, "diff"))
            if args.generate:
                ids = prompt(64)
                g = args.generate
                rows.append((f"`generate`, {g} new tokens after 64 (end to end)", lambda ids=ids, g=g: ours_generate(ids, g),
                             lambda ids=ids, g=g: hf(op="generate", ids=ids, new=g)["t"], g, None))

            weight_bytes = sum(x.nbytes for name, part in (("embed_tokens", model.embed_tokens), ("layers", model.layers),
                                                           ("norm", model.norm))
                               for x in jax.tree.leaves(part) if hasattr(x, "nbytes"))

            def step_bytes(context: int) -> int:
                """What one decode step must read at `context` tokens: every decoder weight and the tied table (the
                lm head), and each layer's keys and values (the window's for sliding layers)."""
                t, total = cfg.text, weight_bytes
                for kind in t.layer_types:
                    g = t.layer_geometry_for_type(kind)
                    slots = min(context, t.sliding_window) if kind == "sliding_attention" else context
                    per_slot = g.num_key_value_heads * g.head_dim * 4 * (1 if (not g.has_v_proj and args.raw_keys) else 2)
                    total += slots * per_slot
                return total

            table = []
            for label, ours_fn, theirs_fn, work, kind in rows:
                fns = {"ours": ours_fn, "theirs": theirs_fn}
                times = {side: ([], []) if kind == "diff" else [] for side in fns}
                first = {}
                for side, fn in fns.items():  # warm-up: compilation (ours), lazy init (theirs)
                    if kind == "diff":
                        first[side] = (fn[0](), fn[1]())
                    else:
                        first[side] = fn()
                for r in range(args.runs):
                    order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
                    for side in order:
                        fn = fns[side]
                        if kind == "diff":  # back to back, so a run's difference sees one load
                            times[side][0].append(fn[0]())
                            times[side][1].append(fn[1]())
                        else:
                            times[side].append(fn())
                med = {}
                compile_s = {}
                for side in fns:
                    if kind == "diff":
                        a, b = float(np.median(times[side][0])), float(np.median(times[side][1]))
                        diffs = np.asarray(times[side][1]) - np.asarray(times[side][0])
                        d = float(np.median(diffs))
                        med[side] = work / d if d > 0 else float("nan")  # nan: the noise swamped the decode time
                        compile_s[side] = (first[side][0] - a) + (first[side][1] - b)
                    else:
                        m = float(np.median(times[side]))
                        med[side] = work / m
                        compile_s[side] = first[side] - m
                ratio = med["ours"] / med["theirs"]
                limit = None
                if kind == "diff":  # decode: tokens/s the read bandwidth allows at this context
                    context = int(label.split("after a ")[1].split("-token")[0].replace(",", "")) + work // 2
                    limit = bandwidth / step_bytes(context)
                table.append((label, med["theirs"], med["ours"], ratio, compile_s["ours"], compile_s["theirs"], limit))
                raw[f"{preset}: {label}"] = {"times": times, "first": first, "limit": limit}
                bound = "" if limit is None else (f"; bandwidth limit {limit:,.1f} tok/s, ours "
                                                  f"{100 * med['ours'] / limit:.0f}% of it")
                print(f"  {label}: transformers {med['theirs']:,.1f} tok/s, ours {med['ours']:,.1f} tok/s, "
                      f"ratio {ratio:.2f}x (ours' first call +{compile_s['ours']:.2f} s){bound}", flush=True)
            tables.append((preset, n_params, table))
    finally:
        hf.close()

    print(f"\nload after: {os.getloadavg()}\n")
    for preset, n_params, table in tables:
        print(f"### {preset} ({n_params / 1e6:.2f} M parameters, fp32), medians of {args.runs} alternating runs\n")
        print("| | transformers (tok/s) | gemma4-eqx (tok/s) | ratio | gemma4-eqx compile (s) | % of the read-bandwidth "
              "limit |")
        print("|---|---|---|---|---|---|")
        for label, theirs, ours, ratio, c_ours, _, limit in table:
            share = "" if limit is None else f"{100 * ours / limit:.0f}% of {limit:,.1f}"
            print(f"| {label} | {theirs:,.1f} | {ours:,.1f} | {ratio:.2f}x | {c_ours:.1f} | {share} |")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({"tables": tables, "raw": raw}, default=float, indent=1))


if __name__ == "__main__":
    main()
