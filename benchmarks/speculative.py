"""Speculative decoding on the trained small checkpoint: acceptance and decode speed, side by side.

Target: `g4.assets.SMALL_CHECKPOINT` (1.66 M parameters). Drafters: the distilled MTP drafter
(`gemma4_eqx/assets/small-drafter`, `scripts/train_small_drafter.py`) and prompt lookup (`g4.PromptLookupDrafter`,
the baseline). Prompts: the first `--prompts` paragraphs of the held-out text (`small/heldout.txt`, never trained
on), 24 tokens each; greedy, no stop id, `--new` tokens. Every configuration is warmed up once (compilation
excluded), then each prompt is timed (one `g4.generate` call: prefill + decode; the prefill is a few ms here).

    .venv/bin/python benchmarks/speculative.py [--new 64] [--k 3] [--prompts 6] [--append-results]

Reports mean accepted drafts per target call, tokens per target call, new tokens per second (wall) and the
speed-up over plain decoding.
"""

from __future__ import annotations

import argparse
import os
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()
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
