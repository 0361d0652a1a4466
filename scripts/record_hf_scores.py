#!/usr/bin/env python
"""Record transformers' per-token log-likelihoods of continuations, the reference for `g4.score`.

For each case, transformers (eager attention, fp32, CPU) runs the rows as one left-padded batch (position ids
built as `generate()` builds them), and the log-softmax of its logits at the position before each continuation
token is gathered at that token (torch's `log_softmax` in fp32), together with whether the token is the argmax.

Usage (deterministic; overwrites the files it writes)::

    .venv-hf/bin/python scripts/record_hf_scores.py --out tests/fixtures/hf_scores

Cases (one ``<out>/<case>.npz`` each):

- ``small_text``: the bundled trained checkpoint (``gemma4_eqx/assets/small``), one row of real text from its
  held-out file (tokenised by transformers' tokenizer for that folder), split into prompt and continuation.
- ``small_left_pad``: the same checkpoint, 3 rows of different lengths (held-out text), one left-padded batch.
- ``tiny_a_image``: the random checkpoint ``tests/fixtures/hf/tiny_a/checkpoint`` (vision tower, sliding window
  8), 2 rows whose prompts hold one image each (grids 2x3 and 3x4, 16 patches with (-1, -1) padding) followed by
  text continuations, left-padded; recorded with the masks of ``create_masks_for_generate`` (our default
  ``mask_mode="intended"``: ``logprobs``) and with the bare forward's own masks (``mask_mode="hf_forward"``:
  ``logprobs_hf_forward``).

Keys of a case file: ``prompt/<i>``, ``continuation/<i>`` (int32 token ids of row i), the media in transformers'
layout (``pixel_values``, ``image_position_ids``: every row's items stacked), ``logprobs`` and ``greedy``
(``[rows, longest continuation]``, float32 / bool, zero / False after a row's end), ``lengths`` (continuation
lengths), and ``meta`` (0-d JSON: checkpoint, versions, description).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from record_hf_reference import (EXPECTED_TRANSFORMERS, Builder, Model, generate_position_ids,  # noqa: E402
                                 intended_masks, to_torch)

SMALL = os.path.join(ROOT, "gemma4_eqx", "assets", "small")
TINY_A = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny_a", "checkpoint")


def left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = True
    return ids, mask


def gather(logits: torch.Tensor, ids: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-probs / argmax flags of the last `lengths[b]` tokens of each right-aligned row."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1).numpy()
    top = logits.argmax(-1).numpy()
    out = np.zeros((len(lengths), max(lengths)), np.float32)
    greedy = np.zeros((len(lengths), max(lengths)), bool)
    s = ids.shape[1]
    for b, c in enumerate(lengths):
        pos = np.arange(s - c - 1, s - 1)
        targets = ids[b, s - c:]
        out[b, :c] = logp[b, pos, targets]
        greedy[b, :c] = top[b, pos] == targets
    return out, greedy


def run(model, inputs: dict, masks=None) -> torch.Tensor:
    kw = to_torch(inputs)
    if masks is not None:
        kw["attention_mask"] = masks
    with torch.no_grad():
        return model(**kw, use_cache=False).logits


def save(out: str, case: str, prompts, conts, logprobs, greedy, meta: dict, **extra) -> None:
    arrays = {f"prompt/{i}": np.asarray(p, np.int32) for i, p in enumerate(prompts)}
    arrays.update({f"continuation/{i}": np.asarray(c, np.int32) for i, c in enumerate(conts)})
    arrays.update(logprobs=logprobs, greedy=greedy, lengths=np.array([len(c) for c in conts], np.int32), **extra)
    meta = dict(meta, transformers=transformers.__version__, torch=torch.__version__,
                script="scripts/record_hf_scores.py")
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path = os.path.join(out, f"{case}.npz")
    np.savez_compressed(path, **arrays)
    print(f"{path}: {len(prompts)} rows, continuations {[len(c) for c in conts]}, "
          f"mean log-prob {float(logprobs.sum() / sum(len(c) for c in conts)):.3f}")


def text_rows(tokenizer, text: str, splits: list[tuple[int, int, int]]) -> tuple[list, list]:
    """(prompts, continuations): for each (start, prompt length, continuation length), <bos> + the prompt tokens
    from `start`, then the continuation tokens right after them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    prompts, conts = [], []
    for start, n_prompt, n_cont in splits:
        assert start + n_prompt + n_cont <= len(ids), (start, n_prompt, n_cont, len(ids))
        prompts.append([bos] + ids[start:start + n_prompt])
        conts.append(ids[start + n_prompt:start + n_prompt + n_cont])
    return prompts, conts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "hf_scores"))
    args = ap.parse_args()
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        sys.exit(f"transformers {EXPECTED_TRANSFORMERS} expected, found {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    small = Model.from_pretrained(SMALL, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(SMALL)
    with open(os.path.join(SMALL, "heldout.txt"), encoding="utf-8") as f:
        text = f.read()
    pad = small.config.text_config.pad_token_id
    base_meta = {"checkpoint": "gemma4_eqx/assets/small", "dtype": "float32", "attn_implementation": "eager"}

    prompts, conts = text_rows(tok, text, [(0, 40, 24)])
    ids, mask = left_pad([np.r_[p, c] for p, c in zip(prompts, conts)], pad)
    lp, gr = gather(run(small, {"input_ids": ids, "attention_mask": mask}), ids, [len(c) for c in conts])
    save(args.out, "small_text", prompts, conts, lp, gr,
         dict(base_meta, desc="one row of held-out text: <bos> + 40 prompt tokens, 24 continuation tokens"))

    prompts, conts = text_rows(tok, text, [(100, 30, 12), (200, 9, 20), (300, 55, 5)])
    ids, mask = left_pad([np.r_[p, c] for p, c in zip(prompts, conts)], pad)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": generate_position_ids(mask)}
    lp, gr = gather(run(small, inputs), ids, [len(c) for c in conts])
    save(args.out, "small_left_pad", prompts, conts, lp, gr,
         dict(base_meta, desc="3 rows of held-out text of different lengths, run as one batch left-padded with "
              "pad id 0, position ids cumsum(mask) - 1 as generate() builds them"))

    tiny = Model.from_pretrained(TINY_A, dtype=torch.float32, attn_implementation="eager").eval()
    b = Builder(tiny.config.text_config.vocab_size, np.random.default_rng(18))
    segments = [[("bos",), ("text", 4), ("image", 6), ("text", 3)], [("bos",), ("text", 2), ("image", 12), ("text", 5)]]
    rows = [b.row(s) for s in segments]
    conts = [b.text(7), b.text(4)]
    prompts = [r[0] for r in rows]
    ids, mask = left_pad([np.r_[p, c] for p, c in zip(prompts, conts)], 0)
    types = np.zeros_like(ids)
    for k, (p, c) in enumerate(zip(rows, conts)):
        types[k, ids.shape[1] - len(p[1]) - len(c):ids.shape[1] - len(c)] = p[1]
    pixel_values, positions = b.images([(2, 3), (3, 4)], P=16)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": generate_position_ids(mask),
              "mm_token_type_ids": types, "pixel_values": pixel_values, "image_position_ids": positions}
    lengths = [len(c) for c in conts]
    lp, gr = gather(run(tiny, inputs, intended_masks(tiny, to_torch(inputs))), ids, lengths)
    lp_fwd, gr_fwd = gather(run(tiny, inputs), ids, lengths)
    save(args.out, "tiny_a_image", prompts, conts, lp, gr,
         dict(base_meta, checkpoint="tests/fixtures/hf/tiny_a/checkpoint",
              desc="2 rows, one image each in the prompt (grids 2x3 and 3x4, 16 patches with (-1, -1) padding), "
                   "text continuations of 7 and 4 tokens; left-padded batch. 'logprobs': masks from "
                   "create_masks_for_generate (mask_mode='intended'); 'logprobs_hf_forward': the bare forward's "
                   "masks (mask_mode='hf_forward')",
              max_abs_diff_modes=float(np.abs(lp - lp_fwd).max())),
         pixel_values=pixel_values, image_position_ids=positions, logprobs_hf_forward=lp_fwd,
         greedy_hf_forward=gr_fwd)


if __name__ == "__main__":
    main()
