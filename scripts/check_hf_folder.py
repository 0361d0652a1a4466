#!/usr/bin/env python
"""Check that a folder written by `gemma4-eqx convert` is complete for transformers: `AutoProcessor` and
`Gemma4UnifiedForConditionalGeneration` load it, the processor gives our token ids, the logits match ours.

Two halves, in two virtual environments, run by one command from the repository root:

    .venv/bin/python scripts/check_hf_folder.py --out /tmp/hf-check --hf-python .venv-tv/bin/python

1. (.venv, JAX) `gemma4-eqx convert` the bundled checkpoint (float32, sharded at 1MB) into `OUT/folder`; our
   `Processor` (read from the converted folder) builds two chat prompts (text; image + text) and the model
   read back from the folder gives the logits (`mask_mode="hf_forward"`, transformers' plain forward), written
   to `OUT/ours.npz` with the inputs.
2. (transformers; started by the first half as `HF_PYTHON this_file --transformers --out OUT`)
   `AutoProcessor.from_pretrained(folder)` must load and give the same input ids (and pixel values within
   1e-6); `Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, float32, eager)` must report no
   missing, unexpected or mismatched tensor; its logits on the same inputs must be within `--tolerance`
   (default 1e-4) of ours at every position. transformers' image processor needs torchvision, hence a venv
   with the torch 2.14.1 / torchvision 0.29.1 pair (`.venv-tv` in DEVELOPERS.md).
Exit status 0 when everything holds; the report is printed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Hello there, how are you?"


def _conversations(image_path: str) -> dict[str, list]:
    return {
        "text": [{"role": "user", "content": [{"type": "text", "text": TEXT}]}],
        "image": [{"role": "user", "content": [{"type": "image", "image": image_path},
                                               {"type": "text", "text": "What is this?"}]}],
    }


def ours(out: str) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np
    from PIL import Image

    import gemma4_eqx as g4
    from gemma4_eqx import cli
    from gemma4_eqx.generate.batching import split_batch, stack_samples

    folder = os.path.join(out, "folder")
    if cli.main(["convert", "--out", folder, "--dtype", "float32", "--max-shard-size", "1MB"]) != 0:
        raise SystemExit("convert failed")
    print("converted folder:", sorted(os.listdir(folder)))
    rng = np.random.default_rng(0)
    image_path = os.path.join(out, "image.png")
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(image_path)
    model = g4.load(folder)
    proc = g4.Processor.from_pretrained(folder)
    record = {}
    for case, conversation in _conversations(image_path).items():
        batch = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        batch = {k: np.asarray(v) for k, v in batch.items() if v is not None}
        samples = split_batch(batch, model.config)
        logits = np.asarray(jax.jit(jax.vmap(lambda b: model(**b, mask_mode="hf_forward")))(stack_samples(samples)))
        for k, v in batch.items():
            record[f"{case}/{k}"] = v
        record[f"{case}/logits"] = logits
        print(f"{case}: {batch['input_ids'].shape[1]} tokens, inputs {sorted(batch)}")
    np.savez(os.path.join(out, "ours.npz"), **record)


def transformers_half(out: str, tolerance: float) -> bool:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

    folder = os.path.join(out, "folder")
    data = np.load(os.path.join(out, "ours.npz"))
    ok = True
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    try:
        proc = AutoProcessor.from_pretrained(folder)
        print(f"AutoProcessor: {type(proc).__name__}")
    except Exception as e:  # e.g. no torchvision in this environment: still check the model on our inputs
        print(f"AutoProcessor: FAILED ({str(e).splitlines()[0][:200]}); the model is checked on our inputs")
        proc, ok = None, False
    model, info = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    print(f"model: {type(model).__name__}, loading problems: {problems or 'none'}")
    ok &= not problems
    model.eval()
    for case, conversation in _conversations(os.path.join(out, "image.png")).items():
        if proc is None:
            names = sorted({k.split("/", 1)[1] for k in data.files if k.startswith(case + "/")} - {"logits"})
            inputs = {k: torch.from_numpy(data[f"{case}/{k}"]) for k in names}
            inputs = {k: v.long() if v.dtype in (torch.int32, torch.bool) else v for k, v in inputs.items()}
        else:
            inputs = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
            same_ids = np.array_equal(inputs["input_ids"].numpy(), data[f"{case}/input_ids"])
            print(f"{case}: transformers' processor gives our input ids: {same_ids}")
            ok &= same_ids
        if proc is not None and "pixel_values" in inputs:
            d = float(np.abs(inputs["pixel_values"].float().numpy() - data[f"{case}/pixel_values"]).max())
            print(f"{case}: max |pixel_values diff| = {d:.2e}")
            ok &= d <= 1e-6
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits.float().numpy()
        d = float(np.abs(logits - data[f"{case}/logits"]).max())
        print(f"{case}: logits {logits.shape}, max |transformers - ours| = {d:.2e} (tolerance {tolerance:g})")
        ok &= d <= tolerance
    print("OK" if ok else "MISMATCH")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--transformers", action="store_true", help="(internal) run the transformers half")
    p.add_argument("--hf-python", default=os.path.join(ROOT, ".venv-tv", "bin", "python"))
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args()
    if args.transformers:
        sys.exit(0 if transformers_half(args.out, args.tolerance) else 1)
    os.makedirs(args.out, exist_ok=True)
    ours(args.out)
    run = subprocess.run([args.hf_python, os.path.abspath(__file__), "--transformers", "--out", args.out,
                          "--tolerance", str(args.tolerance)])
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
