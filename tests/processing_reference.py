"""Recorded transformers outputs for the processing tests (made by scripts/record_hf_processor.py).

The package's annotations are checked here as everywhere in the tests: `conftest.py` imports it under the
jaxtyping/beartype hook.
"""

from __future__ import annotations

import functools
import io
import json
import pathlib

import numpy as np
import PIL.Image

from gemma4_eqx import processing  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "processor"
TINY_TOKENIZER = REPO / "gemma4_eqx" / "assets" / "tiny"
PATCH = 48


@functools.cache
def cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@functools.cache
def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@functools.cache
def processor() -> "processing.Processor":
    return processing.Processor.from_pretrained(TINY_TOKENIZER)


def image_array(name: str) -> np.ndarray:
    return npz("inputs")[f"image/{name}"]


def image_input(name: str):
    """The stored image handed over as the recorder did (PIL for pil_/gray_/rgba_ names)."""
    array = image_array(name)
    if name.startswith("gray_"):
        return PIL.Image.fromarray(array, mode="L")
    if name.startswith("rgba_"):
        return PIL.Image.fromarray(array, mode="RGBA")
    if name.startswith("pil_"):
        return PIL.Image.fromarray(array, mode="RGB")
    return array


def media(name: str) -> np.ndarray:
    return npz("inputs")[name]


def decode_png(data: np.ndarray) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data.tobytes())))


def patches_of(image_u8: np.ndarray, rescale: str) -> np.ndarray:
    """transformers' float32 pixel rows for a resized uint8 image (the recorder checked this layout)."""
    x = image_u8.astype(np.float32)
    x = x / np.float32(255.0) if rescale == "divide" else x * np.float32(1 / 255)
    h, w, _ = x.shape
    rows, cols = h // PATCH, w // PATCH
    return x.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)


def agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |difference|, fraction exactly equal)."""
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return float(diff.max(initial=0.0)), float((diff == 0).mean()) if diff.size else 1.0
