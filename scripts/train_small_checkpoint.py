"""Train the small checkpoint bundled in the package (gemma4_eqx/assets/small): real text, a few CPU-minutes.

    PYTHONPATH=. .venv/bin/python scripts/train_small_checkpoint.py            # writes gemma4_eqx/assets/small/
    PYTHONPATH=. .venv/bin/python scripts/train_small_checkpoint.py --steps 20 --out /tmp/small   # a quick try

Corpus: the license texts in /usr/share/common-licenses (Debian's and Ubuntu's `base-files`, an essential package,
so every such machine has them). They are canonical texts that do not change (GPL-2 of 1991, GPL-3 of 2007, ...);
the script checks each file's SHA-256 and stops, naming the file, if a machine holds another version.
Held out, never trained on: sections 4-7 of GPL-3 (text found in no other license of the set; shipped as
`heldout.txt` for the held-out perplexity in `tests/test_small_checkpoint.py`) and the whole Apache-2.0 license
(another author and style: its perplexity is recorded in training.json as an out-of-domain figure).

What it makes: a byte-fallback BPE of 1024 entries trained on the training texts with Gemma's pipeline and the
special tokens at the ids of the project's small-vocabulary rule (scripts/make_test_tokenizers.py), the tiny
folder's processor files (processor_config.json, tokenizer_config.json, chat_template.jinja), and a model with the
real structure: 5 sliding + 1 full layers, keys as values, proportional RoPE on the full layer, a sliding window
of 32 under training rows of 128 tokens, tied soft-capped logits, vision and audio embedders (untrained, random).
Trained with `g4.train.make_train_step` and optax AdamW on fixed-seed random windows of the token stream, each
row starting with <bos>. Deterministic for a given jax/XLA build: the same seed, the same rows, the same order.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gemma4_eqx as g4
from gemma4_eqx.train import losses

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_test_tokenizers as mtt  # noqa: E402  (the tiny tokenizer's builder and processor files)
from license_corpus import (  # noqa: E402  (the corpus, pinned by SHA-256; shared with evals/)
    HELDOUT_SPAN,
    OUT_OF_DOMAIN_FILE,
    TRAIN_FILES,
    heldout_bounds,
    read_text,
    read_training_files,
)

OUT = REPO / "gemma4_eqx" / "assets" / "small"
VOCAB = 1024
SEQ = 128          # training rows; the sliding window (32) is shorter
EVAL_SEQ = 256     # held-out rows: longer than training, so the full layer's RoPE sees unseen distances too
PROMPT = "This License"
SEED = 20261129


def small_config() -> g4.Gemma4Config:
    cfg = g4.small_config(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                          sliding_window=32, mm_embed_dim=32, mm_posemb_size=64)
    return cfg.replace(eos_token_id=(1, 106))


def token_stream(tok, texts: list[str], eos_id: int) -> np.ndarray:
    """Every document as `<bos> text <eos>` (the tokenizer's post-processor adds <bos>), concatenated."""
    ids = []
    for text in texts:
        ids.extend(tok.encode(text).ids + [eos_id])
    return np.asarray(ids, np.int32)


def training_rows(stream: np.ndarray, steps: int, batch: int, bos_id: int, seed: int) -> np.ndarray:
    """[steps, batch, SEQ]: `<bos>` then SEQ - 1 tokens from a random offset of the stream (fixed seed)."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(stream) - (SEQ - 1) + 1, size=(steps, batch))
    windows = stream[offsets[..., None] + np.arange(SEQ - 1)]
    return np.concatenate([np.full((steps, batch, 1), bos_id, np.int32), windows], axis=-1)


def greedy_tokens(model, proc, prompt: str = PROMPT, n: int = 64) -> np.ndarray:
    """`n` greedy tokens after `<bos> prompt`, with no stop id (so exactly `n`)."""
    cfg = model.config
    ids = np.asarray(proc.tokenizer(prompt)["input_ids"], np.int32)[0]
    return np.asarray(g4.generate(model, ids, max_new_tokens=n, temperature=0.0, stop_ids=(),
                                  suppress_ids=(cfg.eoi_token_id, cfg.eoa_token_id)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    texts = read_training_files()
    name, start, end = heldout_bounds(texts)
    heldout = texts[name][start:end]
    train_texts = [t for n, t in texts.items() if n != name] + [texts[name][:start], texts[name][end:]]
    out_of_domain = read_text(*OUT_OF_DOMAIN_FILE)

    tok = mtt.build_tiny_tokenizer(VOCAB, corpus="".join(train_texts))
    mtt.save_folder(tok, out)
    (out / "heldout.txt").write_text(heldout)
    proc = g4.Processor.from_pretrained(out)

    cfg = small_config()
    t = cfg.text
    stream = token_stream(tok, train_texts, eos_id=tok.token_to_id("<eos>"))
    rows = training_rows(stream, args.steps, args.batch, t.bos_token_id, SEED)
    print(f"corpus: {sum(map(len, train_texts)):,} characters, {len(stream):,} tokens; "
          f"{args.steps} steps x {args.batch} rows x {SEQ} tokens = {rows.size / len(stream):.1f} epochs")

    model = g4.Gemma4(cfg, key=jax.random.key(SEED))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps=min(50, args.steps // 10 + 1),
                                                  decay_steps=args.steps, end_value=args.lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.1))
    opt_state = g4.train.init_optimizer(optimizer, model)
    step = g4.train.make_train_step(optimizer)

    start, eval_seconds = time.perf_counter(), 0.0
    for i in range(args.steps):
        model, opt_state, loss = step(model, opt_state, {"input_ids": jnp.asarray(rows[i])})
        if i % 50 == 0 or i == args.steps - 1:
            t0 = time.perf_counter()
            ppl = float(losses.text_perplexity(model, proc.tokenizer, heldout, EVAL_SEQ))
            eval_seconds += time.perf_counter() - t0
            print(f"step {i:4d}  loss {float(loss):.3f}  held-out perplexity {ppl:8.2f}  "
                  f"{time.perf_counter() - start - eval_seconds:6.1f} s training", flush=True)
    train_seconds = time.perf_counter() - start - eval_seconds

    ppl = float(losses.text_perplexity(model, proc.tokenizer, heldout, EVAL_SEQ))
    ood_ppl = float(losses.text_perplexity(model, proc.tokenizer, out_of_domain, EVAL_SEQ))
    greedy = greedy_tokens(model, proc)
    g4.save(model, out)
    generation = {"bos_token_id": t.bos_token_id, "pad_token_id": t.pad_token_id, "eos_token_id": [1, 106, 50],
                  "suppress_tokens": [cfg.eoa_token_id, cfg.eoi_token_id],
                  "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    record = {
        "script": "scripts/train_small_checkpoint.py", "seed": SEED, "steps": args.steps, "batch": args.batch,
        "seq": SEQ, "lr": args.lr, "train_seconds": round(train_seconds, 1), "final_loss": float(loss),
        "parameters": g4.count_parameters(model), "corpus": {n: s for n, s in TRAIN_FILES.items()},
        "heldout": f"{name} from {HELDOUT_SPAN[1].strip()!r} to before {HELDOUT_SPAN[2].strip()!r}", "heldout_perplexity": round(ppl, 3),
        "heldout_eval_seq": EVAL_SEQ, "out_of_domain": dict([OUT_OF_DOMAIN_FILE]),
        "out_of_domain_perplexity": round(ood_ppl, 3),
        "greedy_prompt": PROMPT, "greedy_distinct_tokens_of_64": int(len(np.unique(greedy))),
        "jax": jax.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"trained {train_seconds:.0f} s; held-out perplexity {ppl:.2f}, Apache-2.0 {ood_ppl:.2f} (vocab {VOCAB}); "
          f"greedy: {len(np.unique(greedy))} distinct of 64: {proc.tokenizer.decode(greedy)!r}")
    print(f"wrote {out} ({g4.count_parameters(model):,} parameters, {size / 2**20:.1f} MiB)")
    if math.isnan(ppl):
        raise SystemExit("training diverged (held-out perplexity is NaN)")


if __name__ == "__main__":
    main()
