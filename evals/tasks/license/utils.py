"""Data loading and scoring for the license tasks (lm-eval imports this file through the YAMLs' `!function`).

The data sit next to this file (written by evals/make_license_tasks.py), so the tasks load the same from any
working directory and never touch the network: `custom_dataset` replaces `datasets.load_dataset`.
"""

from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(name: str):
    import datasets  # lm-eval's own dependency

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(name))})


# lm-eval calls custom_dataset(**metadata, **dataset_kwargs); metadata holds the parsed --model_args too.
def load_mc(**_kwargs):
    return _dataset("license_mc.jsonl")


def load_gen(**_kwargs):
    return _dataset("license_gen.jsonl")


def process_gen(doc: dict, results: list[str]) -> dict:
    """Compare the generation's first words (whitespace-normalized, up to the first newline) with the target's.

    exact_match: all target words, in order, begin the generation. first_word: its first word is the target's.
    prefix_words: the share of target words matched before the first mismatch (partial credit).
    """
    generated = results[0].split("\n")[0].split()
    target = doc["target"].split()
    matched = 0
    for g, t in zip(generated, target):
        if g != t:
            break
        matched += 1
    return {
        "exact_match": float(matched == len(target)),
        "first_word": float(matched >= 1),
        "prefix_words": matched / len(target),
    }
