"""Antialiased bicubic resize of uint8 images, bit-compatible with PyTorch's CPU uint8 kernel.

transformers resizes with `torchvision.transforms.v2.functional.resize(uint8_tensor, size, BICUBIC,
antialias=True)`, which on CPU runs PyTorch's separable uint8 path (`_upsample_bicubic2d_aa`, the
Pillow-SIMD-derived kernel). This module re-implements that arithmetic in NumPy:

1. Per axis, filter weights are computed in float64 like Pillow: scale = in/out, support = 2 * max(scale, 1)
   (the Keys cubic has radius 2 and is stretched when downscaling), centre = scale * (i + 0.5), taps
   xmin = max(int(centre - support + 0.5), 0) .. min(int(centre + support + 0.5), in), each weight
   = cubic((j + xmin - centre + 0.5) / max(scale, 1)) with a = -0.5, then normalised to sum 1.
2. The weights become int16 fixed point: the precision p is the largest (< 22) for which the biggest
   weight of the axis still fits after doubling (round(w_max * 2^(p+1)) < 2^15); each weight is
   w * 2^p rounded half away from zero.
3. Each pass accumulates sum(pixel * w_int) in integers starting from 2^(p-1) (the +0.5 of rounding),
   shifts right by p (floor) and clamps to 0..255. The horizontal pass (width) runs first, then the
   vertical pass on its uint8 result; an axis whose size does not change is skipped.
"""

from __future__ import annotations

import numpy as np

_KEYS_A = -0.5  # Keys' cubic with a = -0.5 (Pillow and PyTorch antialias=True); -0.75 is the no-AA variant.


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _KEYS_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [out, K], int weights [out, K] (0 past each tap range) and the precision p."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = int(np.ceil(support)) * 2 + 1

    centre = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # int() in C++ truncates toward zero; the max(.., 0) makes that equal to floor where it matters.
    xmin = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, max_taps)

    j = np.arange(max_taps, dtype=np.int64)
    valid = j[None, :] < xsize[:, None]
    w = _cubic(((j[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * inv_scale)
    w = np.where(valid, w, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(max_taps):  # sequential sum, the order the C++ loop adds in
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)

    w_max = float(w.max()) if w.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * float(1 << precision)
    w_int = np.trunc(np.where(scaled < 0.0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    index = np.where(valid, xmin[:, None] + j[None, :], xmin[:, None])
    index = np.minimum(index, in_size - 1)
    return index, w_int, precision


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass over `axis` (0 = rows/height, 1 = columns/width) of an (H, W, C) uint8 image."""
    index, w_int, precision = axis_weights(image.shape[axis], out_size)
    shape = list(image.shape)
    shape[axis] = out_size
    # int32 is exact: |sum of weights| < 2^16 and pixels < 2^8, as in the C++ kernel.
    acc = np.full(shape, 1 << (precision - 1), dtype=np.int32)
    w_int = w_int.astype(np.int32)
    for k in range(index.shape[1]):
        taps = np.take(image, index[:, k], axis=axis)
        weight = w_int[:, k].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        acc += taps * weight
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_antialias(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) like torchvision's CPU uint8 bicubic AA."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise TypeError(f"expected an (H, W, C) uint8 image, got {image.dtype} with shape {image.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize to {height}x{width}")
    out = image
    if width != image.shape[1]:
        out = _resample_axis(out, width, axis=1)
    if height != image.shape[0]:
        out = _resample_axis(out, height, axis=0)
    return out if out is not image else image.copy()
