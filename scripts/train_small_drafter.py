#!/usr/bin/env python
"""Distil a small MTP drafter (`g4.Assistant`) for the trained small checkpoint (`g4.assets.SMALL_CHECKPOINT`).

Data: the target's own samples. Prompts are 16-token windows of its training corpus (Debian's license texts, the
files and SHA-256s of `scripts/train_small_checkpoint.py`, held-out span excluded); the target continues each at
temperature 1 to `SEQ` tokens. Objective: at every position t of a sample, the drafter gets what speculative
decoding gives it (the target's KV cache of the tokens before t, the token x_t and the target's final-norm state
that predicted it) and is trained to match the target's next-token distribution there (soft cross-entropy), and
for a second draft step (token x_{t+1}, the drafter's own projected state, the same KV and position) the target's
distribution one further. Plain tied logits (`use_ordered_embeddings=False`; a 1024-token vocabulary needs no
centroids). AdamW, fixed seeds; a few CPU-minutes.

    PYTHONPATH=. .venv/bin/python scripts/train_small_drafter.py            # -> gemma4_eqx/assets/small-drafter
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gemma4_eqx as g4
from gemma4_eqx.io.assistant import save_assistant
from gemma4_eqx.model.assistant import SharedKV, shared_kv
from gemma4_eqx.testing import random_assistant
from gemma4_eqx.model.cache import KVCache
from gemma4_eqx.model.decode import forward_with_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train_small_checkpoint as tsc  # noqa: E402  (corpus files, checksums, held-out span)

OUT = REPO / "gemma4_eqx" / "assets" / "small-drafter"
SEQ = 96
PROMPT = 16
SEED = 20261130


def target_samples(target, n: int, seed: int) -> np.ndarray:
    """[n, SEQ] token rows: a corpus window, then the target's own continuation at temperature 1."""
    texts = {name: tsc.read_text(name, sha) for name, sha in tsc.TRAIN_FILES.items()}
    name, first, stop = tsc.HELDOUT_SPAN
    start, end = texts[name].index(f"\n{first}\n") + 1, texts[name].index(f"\n{stop}\n") + 1
    train = [t for k, t in texts.items() if k != name] + [texts[name][:start], texts[name][end:]]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(g4.assets.SMALL_CHECKPOINT / "tokenizer.json"))
    stream = tsc.token_stream(tok, train, eos_id=1)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(stream) - PROMPT, size=n)
    prompts = np.stack([np.concatenate([[2], stream[o:o + PROMPT - 1]]) for o in offsets]).astype(np.int32)
    cfg = target.config
    never = (*cfg.placeholder_ids, cfg.boi_token_id, cfg.eoi_token_id, cfg.boa_token_id, cfg.eoa_token_id)
    rows = []
    for i in range(0, n, 32):
        new = g4.generate(target, prompts[i:i + 32], max_new_tokens=SEQ - PROMPT, temperature=1.0, top_k=0,
                          top_p=1.0, stop_ids=(), suppress_ids=never, key=jax.random.key(seed + i))
        rows.append(np.concatenate([prompts[i:i + 32], np.asarray(new)], 1))
    return np.concatenate(rows)


def teacher(target, ids):
    """One row: the target's final-norm states, logits and cache (its ring holding every slot)."""
    cache = KVCache.init(target.config, max_len=SEQ, dtype=target.dtype, spare=SEQ)
    h, cache = forward_with_cache(target, ids, cache, validate=False)
    return h, target.logits_from_hidden(h), cache


def row_loss(drafter, target, ids):
    h, logits, cache = jax.lax.stop_gradient(teacher(target, ids))
    window = drafter.config.text.sliding_window
    kv = shared_kv(target, cache, window)  # the masks are rebuilt per position below
    scale = jnp.asarray(target.config.text.embed_scale, jnp.float32).astype(target.dtype)
    slots = jnp.arange(SEQ)
    ts = jnp.arange(1, SEQ - 1)  # pending token x_t (t >= 1 has a predicting state h_{t-1}), two steps: t + 1 < SEQ

    def at(t):
        view = SharedKV(kv.sliding_k, kv.sliding_v, (slots < t) & (slots >= t - window - 1), kv.full_k, kv.full_v,
                        slots < t, t)
        l1, state = drafter.step(target.embed_tokens[ids[t]] * scale, h[t - 1], view)
        l2, _ = drafter.step(target.embed_tokens[ids[t + 1]] * scale, state, view)
        ce = lambda student, teacher_logits: -jnp.sum(jax.nn.softmax(teacher_logits) * jax.nn.log_softmax(student))
        agree = (jnp.argmax(l1) == jnp.argmax(logits[t])).astype(jnp.float32)
        return ce(l1, logits[t]) + 0.5 * ce(l2, logits[t + 1]), agree

    losses, agree = jax.vmap(at)(ts)
    return jnp.mean(losses), jnp.mean(agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    t0 = time.time()
    target = g4.load(g4.assets.SMALL_CHECKPOINT)
    data = target_samples(target, args.samples, SEED)
    t_data = time.time() - t0
    drafter = random_assistant(target, key=jax.random.key(SEED), hidden_size=64, intermediate_size=192,
                               num_attention_heads=4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps=min(20, args.steps // 2), decay_steps=max(args.steps, 2))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(eqx.filter(drafter, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(drafter, opt_state, rows):
        def loss_fn(d):
            loss, agree = jax.vmap(lambda r: row_loss(d, target, r))(rows)
            return jnp.mean(loss), jnp.mean(agree)

        (loss, agree), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(drafter)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(drafter, eqx.is_inexact_array))
        return eqx.apply_updates(drafter, updates), opt_state, loss, agree

    rng = np.random.default_rng(SEED)
    t1 = time.time()
    log = []
    for i in range(args.steps):
        rows = jnp.asarray(data[rng.integers(0, len(data), args.batch)])
        drafter, opt_state, loss, agree = step(drafter, opt_state, rows)
        if i % 50 == 0 or i == args.steps - 1:
            log.append((i, float(loss), float(agree)))
            print(f"step {i:4d}  loss {float(loss):.3f}  first-draft argmax agreement {float(agree):.3f}", flush=True)
    t_train = time.time() - t1
    save_assistant(drafter, args.out)
    info = dict(script="scripts/train_small_drafter.py", seed=SEED, samples=args.samples, seq=SEQ, prompt=PROMPT,
                steps=args.steps, batch=args.batch, lr=args.lr, data_seconds=round(t_data, 1),
                train_seconds=round(t_train, 1), log=log,
                parameters=int(sum(x.size for x in jax.tree.leaves(eqx.filter(drafter, eqx.is_array)))))
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
