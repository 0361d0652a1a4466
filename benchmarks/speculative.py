"""Speculative decoding on the trained small checkpoint: acceptance and decode speed, side by side.

Target: `g4.assets.SMALL_CHECKPOINT` (1.66 M parameters). Drafters: the distilled MTP drafter
(`gemma4_eqx/assets/small-drafter`, `scripts/train_small_drafter.py`) and prompt lookup (`g4.PromptLookupDrafter`,
the baseline). Prompts: the first `--prompts` paragraphs of the held-out text (`small/heldout.txt`, never trained
on), 24 tokens each; greedy, no stop id, `--new` tokens. Every configuration is warmed up once (compilation
excluded), then each prompt is timed (one `g4.generate` call: prefill + decode; the prefill is a few ms here).

    .venv/bin/python benchmarks/speculative.py [--new 64] [--k 3] [--prompts 6] [--append-results]
    PYTHONPATH=. python3 benchmarks/speculative.py --gpu-12b --out $OUT      # on a lent GPU: speed only

`--gpu-12b`: the real 12B text shapes with random bf16 weights and a random drafter of the assistant's real shape
(4 layers of hidden 1024, vocabulary 262,144, backbone 3840, ~0.4 B parameters): decode tokens/s at batch 1 without
a drafter, with the MTP drafter (random: nearly every draft rejected, so this is the cost of a round) and with
prompt lookup on a repetitive prompt (a random model repeats itself: most drafts accepted), plus the time of one
target call over k + 1 tokens against one decode step. Writes `<out>/speculative_12b.json`.

Reports mean accepted drafts per target call, tokens per target call, new tokens per second (wall) and the
speed-up over plain decoding.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

import gemma4_eqx as g4

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAFTER = os.path.join(REPO, "gemma4_eqx", "assets", "small-drafter")
MACHINE = "dev VM: 2 cores of an Intel Sapphire Rapids, 24 GiB, CPU only"


def heldout_prompts(n: int, length: int = 24) -> list[np.ndarray]:
    proc = g4.Processor.from_pretrained(g4.assets.SMALL_CHECKPOINT)
    text = (g4.assets.SMALL_CHECKPOINT / "heldout.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) > 30]
    out = []
    for p in paragraphs[:n]:
        ids = np.asarray(proc.tokenizer(" ".join(p.split()))["input_ids"], np.int32)[0]
        out.append(ids[:length])
    return out


def run(model, prompts, new: int, k: int, drafter=None) -> dict:
    kw = dict(max_new_tokens=new, temperature=0.0, stop_ids=(), suppress_ids=(), return_result=True)
    if drafter is not None:
        kw.update(assistant=drafter, num_draft_tokens=k)
    g4.generate(model, prompts[0], **kw)  # compile
    tokens, seconds, accepted, calls = [], 0.0, [], []
    for p in prompts:
        t = time.perf_counter()
        r = g4.generate(model, p, **kw)
        seconds += time.perf_counter() - t
        tokens.append(np.asarray(r.tokens))
        if drafter is not None:
            accepted.append(r.accepted_per_call)
            calls.append(r.target_calls)
    n_tokens = sum(len(t) for t in tokens)
    row = dict(tokens=tokens, tok_s=n_tokens / seconds, seconds=seconds)
    if drafter is not None:
        row.update(accepted=float(np.mean(accepted)), per_call=n_tokens / (sum(calls) + len(prompts)))
    return row


def gpu_12b(out_dir: str, k: int, new: int) -> None:
    import json

    import jax.numpy as jnp

    from gemma4_eqx.testing import random_assistant

    report = {"device": str(jax.devices()[0]), "jax": jax.__version__, "k": k, "new": new}

    def save():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "speculative_12b.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report), flush=True)

    t = time.perf_counter()
    cfg = g4.Gemma4Config.gemma4_12b().replace(vision=None, audio=None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_12b import random_on_device  # every array drawn on the device: no eager init of 12 B parameters

    model = random_on_device(cfg, jnp.bfloat16)
    drafter = random_assistant(model, key=jax.random.key(1), hidden_size=1024, intermediate_size=8192,
                               num_attention_heads=16, dtype=jnp.bfloat16)
    jax.block_until_ready((model, drafter))
    report["build_s"] = time.perf_counter() - t
    report["drafter_parameters"] = g4.count_parameters(drafter)
    save()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 200_000, 128).astype(np.int32)
    kw = dict(max_new_tokens=new, temperature=0.0, stop_ids=(), suppress_ids=(), return_result=True)
    for name, extra in (("plain", {}), ("mtp_random", dict(assistant=drafter, num_draft_tokens=k)),
                        ("prompt_lookup", dict(assistant=g4.PromptLookupDrafter(ngram=3), num_draft_tokens=k))):
        try:
            t = time.perf_counter()
            g4.generate(model, prompt, **kw, **extra)
            compile_s = time.perf_counter() - t
            times = []
            for _ in range(3):
                t = time.perf_counter()
                r = g4.generate(model, prompt, **kw, **extra)
                times.append(time.perf_counter() - t)
            best = min(times)
            report[name] = dict(first_call_s=compile_s, best_s=best, tok_s=new / best,
                                accepted_per_call=r.accepted_per_call, target_calls=r.target_calls)
        except Exception as e:  # record and go on
            report[name] = dict(error=f"{type(e).__name__}: {e}"[:500])
        save()
    if "tok_s" in report.get("plain", {}):
        for name in ("mtp_random", "prompt_lookup"):
            if "tok_s" in report.get(name, {}):
                report[name]["speedup"] = report[name]["tok_s"] / report["plain"]["tok_s"]
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-12b", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()
    if args.gpu_12b:
        return gpu_12b(args.out, k=4 if args.k == 3 else args.k, new=args.new)
    model = g4.load(g4.assets.SMALL_CHECKPOINT)
    prompts = heldout_prompts(args.prompts)
    rows = {"plain": run(model, prompts, args.new, args.k)}
    rows["prompt lookup (ngram 3)"] = run(model, prompts, args.new, args.k, g4.PromptLookupDrafter(ngram=3))
    rows["distilled MTP drafter"] = run(model, prompts, args.new, args.k, g4.load_assistant(DRAFTER))
    for name, r in rows.items():
        for a, b in zip(r["tokens"], rows["plain"]["tokens"]):
            assert np.array_equal(a, b), f"{name}: tokens differ from plain greedy decoding"
    base = rows["plain"]["tok_s"]
    lines = [f"| decoding | mean accepted drafts / target call | tokens / target call | new tok/s | speed-up |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        acc = "-" if "accepted" not in r else f"{r['accepted']:.2f} of {args.k}"
        per = "1.00" if "per_call" not in r else f"{r['per_call']:.2f}"
        lines.append(f"| {name} | {acc} | {per} | {r['tok_s']:.0f} | {r['tok_s'] / base:.2f}x |")
    head = (f"\n## Speculative decoding on the small checkpoint ({time.strftime('%Y-%m-%d')})\n\n"
            f"`benchmarks/speculative.py --new {args.new} --k {args.k} --prompts {args.prompts}` on the {MACHINE} "
            f"(jax {jax.__version__}, {platform.machine()}): target `g4.assets.SMALL_CHECKPOINT` (1.66 M parameters), "
            f"greedy, {args.new} new tokens after each of {args.prompts} held-out prompts of 24 tokens, "
            f"{args.k} drafts per target call; compilation excluded (one warm-up call each); every row's tokens "
            "equal plain greedy decoding's.\n")
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.append_results:
        with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
