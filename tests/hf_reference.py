"""Reading the transformers reference outputs recorded by scripts/record_hf_reference.py."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

HF_DIR = pathlib.Path(__file__).parent / "fixtures" / "hf"
INPUT_FIELDS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values",
                "image_position_ids", "pixel_values_videos", "video_position_ids", "num_frames_per_video",
                "input_features", "input_features_mask")


def checkpoints() -> list[str]:
    return sorted(p.name for p in HF_DIR.iterdir() if (p / "cases.npz").exists()) if HF_DIR.exists() else []


@functools.lru_cache(maxsize=None)
def cases(name: str) -> dict[str, dict[str, np.ndarray]]:
    data = np.load(HF_DIR / name / "cases.npz")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        case, field = key.split("/", 1)
        out.setdefault(case, {})[field] = data[key]
    return out


def checkpoint_dir(name: str) -> pathlib.Path:
    return HF_DIR / name / "checkpoint"


def meta(case: dict) -> dict:
    return json.loads(str(case["meta"])) if "meta" in case else {}


def inputs(case: dict) -> dict[str, np.ndarray]:
    return {k: case[k] for k in INPUT_FIELDS if k in case}


def case_ids(fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """(checkpoint, case) pairs whose recorded outputs include one of `fields`."""
    return [(n, c) for n in checkpoints() for c, d in cases(n).items() if any(f in d for f in fields)]


@functools.cache
def bf16_order_differs() -> bool:
    """Whether XLA:CPU's bf16 arithmetic on this CPU adds in another order than on the kind of CPU the bf16
    references were recorded on (x86-64 with AVX-512 and no native bf16 dot instructions).

    XLA:CPU picks its matrix-product kernels and the width of its vectorised reductions by instruction set: with
    native bf16 dots (AVX512-BF16 or AMX-BF16, e.g. Sapphire Rapids) or without AVX-512 at all (AVX2 only, e.g. an
    AMD EPYC measured 2026-12-06) about 1e-4 of the bf16 products round to the neighbouring bf16 value. The
    bit-exact bf16 checks hold on the recording kind of CPU; on the others they are held to the one-ulp-flip
    bounds instead (the fp32 and fp64 checks do not depend on it).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # not Linux x86-64: not the recording kind
    return "avx512f" not in flags or "avx512_bf16" in flags or "amx_bf16" in flags
