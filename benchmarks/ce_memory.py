"""Memory of the next-token cross-entropy at the 12B's vocabulary: dense logits vs `g4.losses.next_token_nll`.

    PYTHONPATH=. .venv/bin/python benchmarks/ce_memory.py [--seq 8192] [--embedding-dtype bfloat16]

Compiles value-and-gradient (w.r.t. the hidden states and the tied embedding) on `jax.ShapeDtypeStruct`s, so no
array is allocated, and prints XLA's `memory_analysis()`: temporaries (what the loss needs beyond its inputs
and outputs), arguments and outputs (the gradients, the same for both). Hidden states are fp32 (the loss's
precision, as in `g4.train.sequence_nll`); the embedding is the model's (bf16 for the 12B).
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

import gemma4_eqx as g4
from gemma4_eqx.train import losses


def gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--embedding-dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=losses.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--vocab-block-size", type=int, default=losses.DEFAULT_VOCAB_BLOCK_SIZE)
    args = parser.parse_args()
    t = g4.Gemma4Config.gemma4_12b().text
    rows = args.seq - 1  # position t predicts token t + 1
    h = jax.ShapeDtypeStruct((rows, t.hidden_size), jnp.float32)
    table = jax.ShapeDtypeStruct((t.vocab_size, t.hidden_size), jnp.dtype(args.embedding_dtype))
    targets = jax.ShapeDtypeStruct((rows,), jnp.int32)
    cap = t.final_logit_softcapping
    fns = {
        "dense": lambda h, e, y: losses.dense_next_token_nll(h, e, y, softcap=cap),
        "blocked": lambda h, e, y: losses.next_token_nll(h, e, y, softcap=cap, block_size=args.block_size,
                                                         vocab_block_size=args.vocab_block_size),
        "blocked, accumulate_in_loss_dtype=False": lambda h, e, y: losses.next_token_nll(
            h, e, y, softcap=cap, block_size=args.block_size, vocab_block_size=args.vocab_block_size,
            accumulate_in_loss_dtype=False),
    }
    print(f"{platform.node()} ({jax.devices()[0].platform}): vocab {t.vocab_size}, hidden {t.hidden_size}, "
          f"{rows} rows, embedding {args.embedding_dtype}; blocks {args.block_size} rows x "
          f"{args.vocab_block_size} vocab")
    for name, fn in fns.items():
        for what, f in (("loss", lambda h, e, y, fn=fn: jnp.sum(fn(h, e, y))),
                        ("loss+grad", jax.value_and_grad(lambda h, e, y, fn=fn: jnp.sum(fn(h, e, y)),
                                                         argnums=(0, 1)))):
            m = jax.jit(f).lower(h, table, targets).compile().memory_analysis()
            print(f"  {name:40s} {what:10s} temp {gib(m.temp_size_in_bytes)}  args {gib(m.argument_size_in_bytes)}"
                  f"  out {gib(m.output_size_in_bytes)}")


if __name__ == "__main__":
    main()
