"""Peak resident memory and time of `g4.load` on a synthetic checkpoint with the real 12B widths.

The checkpoint is the 12B with one period of layers (5 sliding + 1 full instead of 8 periods): real embedding
(262144 x 3840), real layer shapes, vision and audio embedders; 2.42 G parameters, 4.8 GB in bf16, 9.7 GB in
fp32. It is written tensor by tensor with the package's own streaming safetensors writer (never held in memory
whole), then loaded in a fresh subprocess per case, which reports its peak resident set (`VmHWM` in
/proc/self/status: anonymous memory and any file pages mapped in, e.g. by mmap) against the bytes of the model
it built. Page-cache pages of files read with `read`/`preadv` are not the process's memory and do not count.

Run: .venv/bin/python benchmarks/load_memory.py [--workdir DIR] [--cases bf16 fp32-to-bf16 fp32] [--keep]
     (a case alone, on an existing folder: --measure FOLDER --dtype bfloat16; another copy of the package, e.g.
     an older commit unpacked with `git archive COMMIT gemma4_eqx | tar -x -C DIR`: --pythonpath DIR)
Disk: 4.8 GB (bf16) + 9.7 GB (fp32) in a temporary folder, removed at the end unless --workdir/--keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def config(num_periods: int = 1):
    import gemma4_eqx as g4
    from gemma4_eqx.config import FULL, SLIDING

    cfg = g4.Gemma4Config.gemma4_12b()
    n = 6 * num_periods
    types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n))
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=n, layer_types=types))


def write_checkpoint(folder: str, dtype_name: str, max_shard_size: str = "5GB") -> int:
    """Random tensors of the right shapes, generated and written one at a time; returns the data bytes."""
    import equinox as eqx
    import jax

    import gemma4_eqx as g4
    from gemma4_eqx.io import checkpoint
    from gemma4_eqx.io.safetensors import DTYPES, write_file

    cfg = config()
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0)))
    specs = checkpoint.tensor_specs(abstract)
    dtype = DTYPES[dtype_name]
    block = (0.02 * np.random.default_rng(0).standard_normal(2**22, np.float32)).astype(dtype)
    limit = checkpoint.parse_size(max_shard_size)
    shards, size = [[]], 0
    for s in specs:
        nbytes = math.prod(s.shape) * dtype.itemsize
        if size and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes

    def tensors(group):
        for i, s in enumerate(group):
            n = math.prod(s.shape)
            t = np.resize(np.roll(block, i), n).reshape(s.shape)  # a shifted random block, repeated
            yield s.name, t
            del t

    os.makedirs(folder, exist_ok=True)
    files = ([checkpoint.SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for file, group in zip(files, shards):
        total += write_file(os.path.join(folder, file), [(s.name, dtype_name, s.shape) for s in group],
                            tensors(group), {"format": "pt"})
        weight_map.update({s.name: file for s in group})
    if len(files) > 1:
        with open(os.path.join(folder, checkpoint.SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg.save_pretrained(folder, dtype={"BF16": "bfloat16", "F32": "float32"}[dtype_name])
    return total


def measure(folder: str, dtype_name: str, layer_by_layer: bool = False) -> dict:
    """In this (fresh) process: load `folder` as `dtype_name` and report peak memory and time.

    `layer_by_layer`: force the accelerator path (stacked leaves allocated on the device and filled one
    tensor at a time, in place) on the CPU device.
    """
    import jax
    import jax.numpy as jnp

    import gemma4_eqx as g4

    jnp.zeros(1).block_until_ready()  # initialise the backend before the baseline
    base = status_kib("VmRSS")
    t0 = time.perf_counter()
    if layer_by_layer:
        from gemma4_eqx.io.checkpoint import load_from_folder

        model = load_from_folder(folder, dtype=jnp.dtype(dtype_name), layer_by_layer=True)
    else:
        model = g4.load(folder, dtype=jnp.dtype(dtype_name))
    jax.block_until_ready(model)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    after = status_kib("VmRSS")
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    # spot check after the peak is taken: one transposed, stacked tensor equals the file's
    from gemma4_eqx.io.checkpoint import SafetensorsReader

    reader = SafetensorsReader(folder)
    name = "model.language_model.layers.3.self_attn.q_proj.weight"
    expect = reader.read(name).T.astype(np.dtype(jnp.dtype(dtype_name)))
    ok = bool(np.array_equal(np.asarray(model.layers.layer(3).self_attn.q_proj.weight), expect))
    return {"file_bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                              if f.endswith(".safetensors")),
            "model_bytes": model_bytes, "baseline_rss": base * 1024, "peak_rss": peak * 1024, "rss_after": after * 1024,
            "seconds": seconds, "spot_check": ok}


def run_case(folder: str, dtype_name: str, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", folder, "--dtype", dtype_name],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = {  # name: (file dtype, model dtype)
    "bf16": ("BF16", "bfloat16"),
    "fp32-to-bf16": ("F32", "bfloat16"),
    "fp32": ("F32", "float32"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layer-by-layer", action="store_true", help="with --measure: force the accelerator path")
    ap.add_argument("--workdir")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--pythonpath", help="load with another copy of the package (e.g. an older commit)")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype, args.layer_by_layer)))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="g4_load_memory_")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB; workdir {work}")
    written = {}
    try:
        print(f"{'case':<14} {'file GB':>8} {'model GB':>9} {'peak GB':>8} {'peak/model':>10} "
              f"{'(peak-base)/model':>17} {'load s':>7}  check")
        for case in args.cases:
            file_dtype, model_dtype = CASES[case]
            folder = os.path.join(work, file_dtype)
            if file_dtype not in written and os.path.exists(os.path.join(folder, "config.json")):
                written[file_dtype] = 0  # reuse a checkpoint an earlier run left in --workdir
            if file_dtype not in written:
                t = time.perf_counter()
                written[file_dtype] = write_checkpoint(folder, file_dtype)
                print(f"  (wrote {written[file_dtype] / 1e9:.2f} GB {file_dtype} in {time.perf_counter() - t:.1f} s)")
            r = run_case(folder, model_dtype, args.pythonpath)
            print(f"{case:<14} {r['file_bytes'] / 1e9:>8.2f} {r['model_bytes'] / 1e9:>9.2f} "
                  f"{r['peak_rss'] / 1e9:>8.2f} {r['peak_rss'] / r['model_bytes']:>10.3f} "
                  f"{(r['peak_rss'] - r['baseline_rss']) / r['model_bytes']:>17.3f} {r['seconds']:>7.1f}  "
                  f"{'ok' if r['spot_check'] else 'MISMATCH'}", flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
