#!/usr/bin/env python
"""Record the export check: a checkpoint written by `g4.save` from a sharded model, run by transformers.

Two halves, in two virtual environments, run by one command from the repository root:

    .venv/bin/python scripts/record_hf_export.py            # writes tests/fixtures/export/

1. (.venv, JAX) a small random `Gemma4` (`g4.small_config()`, `g4.testing.random_model(seed=2024)`, float32)
   is sharded over a (2, 4) mesh of 8 simulated CPU devices and written with `g4.save(..., max_shard_size=
   "1MB")` into `tests/fixtures/export/checkpoint/` (sharded files + `model.safetensors.index.json`).
2. (.venv-hf, torch + transformers; started by the first half as `.venv-hf/bin/python this_file --transformers
   OUT`) `Gemma4UnifiedForConditionalGeneration.from_pretrained(checkpoint, dtype=float32, eager attention)`
   must report no missing, unexpected or mismatched tensor; its logits (plain `model(**inputs)`) for three
   input sets are written to `tests/fixtures/export/logits.npz`, with the inputs.

Inputs are taken from `tests/fixtures/hf/tiny_a/cases.npz` (same vocabulary size and special-id rule as
`small_config()`): `text_long` (48 tokens, 6 sliding windows), `left_pad` (3 left-padded rows, generate-style
positions) and `mm_mixed` (text + image + audio). `tests/test_export.py` loads the checkpoint with `g4.load`
and compares. Deterministic; rerunning rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "export")
INPUTS = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny_a", "cases.npz")
CASES = ("text_long", "left_pad", "mm_mixed")
INPUT_FIELDS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values",
                "image_position_ids", "input_features", "input_features_mask")
SEED = 2024


def write_checkpoint(out: str) -> None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax

    import gemma4_eqx as g4
    from gemma4_eqx.model import sharding
    from gemma4_eqx.testing import random_model

    model = random_model(g4.small_config(), seed=SEED)
    sharded = sharding.shard_model(model, sharding.make_mesh(fsdp=2, tp=4), sharding.FSDP_TP)
    assert not sharded.layers.runs[0].mlp.up_proj.weight.sharding.is_fully_replicated
    folder = os.path.join(out, "checkpoint")
    shutil.rmtree(folder, ignore_errors=True)
    g4.save(sharded, folder, max_shard_size="1MB")
    print(f"wrote {sorted(os.listdir(folder))} from a model sharded over {jax.device_count()} devices")


def record_transformers(out: str) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(0)
    model, info = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        os.path.join(out, "checkpoint"), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"transformers did not load every tensor as is: {problems}")
    model.eval()
    src = np.load(INPUTS)
    record = {"_info/meta": np.array(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED,
        "inputs_from": "tests/fixtures/hf/tiny_a/cases.npz", "loading_info": {k: list(v) for k, v in info.items()},
        "call": "model(**inputs, use_cache=False).logits, float32, eager attention"}))}
    for case in CASES:
        inputs = {f: src[f"{case}/{f}"] for f in INPUT_FIELDS if f"{case}/{f}" in src.files}
        kwargs = {}
        for k, v in inputs.items():
            t = torch.from_numpy(np.asarray(v))
            if k == "attention_mask":
                t = t.long()
            elif k in ("input_ids", "position_ids", "mm_token_type_ids", "image_position_ids"):
                t = t.long()
            kwargs[k] = t
        with torch.no_grad():
            logits = model(**kwargs, use_cache=False).logits.float().numpy()
        for k, v in inputs.items():
            record[f"{case}/{k}"] = v
        record[f"{case}/logits"] = logits
        print(f"{case}: logits {logits.shape}, max |logit| {np.abs(logits).max():.2f}")
    np.savez_compressed(os.path.join(out, "logits.npz"), **record)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--transformers", action="store_true", help="(internal) run the transformers half")
    p.add_argument("--hf-python", default=os.path.join(ROOT, ".venv-hf", "bin", "python"))
    args = p.parse_args()
    if args.transformers:
        record_transformers(args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    write_checkpoint(args.out)
    subprocess.run([args.hf_python, os.path.abspath(__file__), "--transformers", "--out", args.out], check=True)


if __name__ == "__main__":
    main()
