"""Image processor of Gemma 4 Unified (docs/spec/processors.md §1, §11.3).

Per image: convert to RGB uint8, resize (aspect preserving, sides multiples of 48 px, area budget
max_soft_tokens * 9 * 256 px) with the torchvision-exact bicubic of `resize.py`, rescale to [0, 1] in
float32, cut into 48 x 48 patches flattened (row, col, RGB) in raster order with (x, y) = (col, row)
positions, and pad to max_soft_tokens rows of zeros at position (-1, -1).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..utils.files import check_size, open_regular
from ._batch import BatchFeature, check_return_tensors, stack_or_empty
from .fields import boolean, check_fields, integer, number, numbers_list, one_of
from .files import MAX_IMAGE_BYTES
from .resize import resize_bicubic_antialias

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
ImageLike = Any  # PIL.Image.Image | np.ndarray [H, W, C] uint8 | str | os.PathLike

# The checks of every ImageProcessor field (VideoProcessor adds its own): the 12B's values are 16, 3, 280, 1/255.
# patch_size * pooling_kernel_size is the side of one soft token's patch; the bounds keep one image's pixel_values
# (max_soft_tokens x 3 x that side squared float32) under half a GB.
IMAGE_FIELDS = {
    "patch_size": integer(1, 32),
    "pooling_kernel_size": integer(1, 6),
    "max_soft_tokens": one_of(*SUPPORTED_SOFT_TOKENS),
    "do_convert_rgb": boolean,
    "do_resize": boolean,
    "do_rescale": boolean,
    "rescale_factor": number(0, 1, lo_open=True),
    "do_normalize": boolean,
    "image_mean": numbers_list(3, -1e3, 1e3),
    "image_std": numbers_list(3, 0, 1e3, lo_open=True),
    "resample": one_of(3, note=" (3 is bicubic, the only mode implemented)"),
}


def check_max_soft_tokens(max_soft_tokens: int) -> None:
    check_fields({"max_soft_tokens": max_soft_tokens}, {"max_soft_tokens": IMAGE_FIELDS["max_soft_tokens"]}, "")


def aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """Largest (h, w), multiples of pooling_kernel_size * patch_size, within max_patches patches (§1.2)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot process an image of {height}x{width} pixels: it has no pixels")
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    unit = pooling_kernel_size * patch_size
    target_h = int(math.floor(factor * height / unit)) * unit
    target_w = int(math.floor(factor * width / unit)) * unit
    if target_h == 0 and target_w == 0:
        raise ValueError(f"image of {height}x{width} would be resized to 0x0 (sides are multiples of {unit})")
    max_side = (max_patches // pooling_kernel_size**2) * unit
    if target_h == 0:  # very wide: one row of merged patches
        target_h, target_w = unit, min(int(math.floor(width / height)) * unit, max_side)
    elif target_w == 0:  # very tall: one column
        target_h, target_w = min(int(math.floor(height / width)) * unit, max_side), unit
    if target_h * target_w > target_px:
        raise ValueError(
            f"resizing {height}x{width} to {target_h}x{target_w} exceeds {max_patches} patches of {patch_size} px"
        )
    return target_h, target_w


def _pil_to_rgb(image: PIL.Image.Image, what: str = "image") -> np.ndarray:
    """PIL's own conversion; transparent images are composited onto white first (as transformers does).

    16-bit, 32-bit integer and float images (modes I;16*, I, F) go through PIL's conversion too, which is what
    transformers does: values are clipped to 0..255 and fractions dropped, never rescaled. That loses the image
    when its values are not already 0..255, so a warning says so; NaN or infinite pixels are refused.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image)
        if not np.isfinite(values).all():
            raise ValueError(f"{what}: a {image.mode} image with NaN or infinite pixels; expected finite values")
        low, high = values.min(), values.max()
        if low < 0 or high > 255 or (image.mode == "F" and not np.array_equal(values, np.floor(values))):
            warnings.warn(f"{what}: a mode {image.mode} image with values in [{low}, {high}] is converted to RGB as "
                          "transformers converts it (PIL clips to 0..255 and drops fractions, it does not rescale); "
                          "scale it to 0..255 uint8 first, e.g. Image.fromarray((x / x.max() * 255).astype(np.uint8))",
                          UserWarning, stacklevel=4)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def _blend_over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA -> RGB over white in float32, truncated back to uint8 (torchvision's to_dtype rule)."""
    x = rgba.astype(np.float32) * np.float32(1.0 / 255.0)
    alpha = x[..., 3:]
    rgb = x[..., :3] * alpha + (np.float32(1.0) - alpha)
    return (rgb * np.float32(255.0 + 1.0 - 1e-3)).astype(np.uint8)


def array_to_rgb(array: np.ndarray, what: str = "image") -> np.ndarray:
    """(H, W, 1 | 3 | 4) uint8 -> (H, W, 3) uint8 (gray replicated, alpha blended over white)."""
    if array.dtype != np.uint8:
        raise TypeError(
            f"{what}: expected a uint8 array, got {array.dtype}; convert floats in [0, 1] with "
            "(x * 255).round().astype(np.uint8) and 16-bit values with (x >> 8).astype(np.uint8)"
        )
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        hint = " (channels-first? use array.transpose(1, 2, 0))" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        hint += " (a 2-D grayscale array needs a channel axis: array[..., None])" if array.ndim == 2 else ""
        raise ValueError(f"{what}: expected an array of shape (H, W, C) with C in (1, 3, 4), got {array.shape}{hint}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return _blend_over_white(array)
    return np.ascontiguousarray(array)


def load_image(path: str | os.PathLike, max_bytes: int | None = MAX_IMAGE_BYTES) -> PIL.Image.Image:
    """Open an image file upright (EXIF orientation applied), as transformers' `load_image` does.

    Only a regular file (or a symlink to one) of at most `max_bytes` is read: a directory, FIFO or device is refused
    with `FileReadError` naming it and what it is; a file PIL cannot read is a ValueError naming the file."""
    with open_regular(path, "an image file") as f:
        check_size(f, path, max_bytes, "an image file")
        try:
            image = PIL.Image.open(f)
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
        except PIL.Image.DecompressionBombError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None
        except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{os.fspath(path)}: not a readable image ({e})") from None


def to_rgb_array(image: ImageLike, what: str = "image") -> np.ndarray:
    """Any supported image input -> (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        rgb = _pil_to_rgb(image, what)
    elif isinstance(image, np.ndarray):
        rgb = array_to_rgb(image, what)
    else:
        raise TypeError(f"{what}: expected a PIL image, a file path or a uint8 array, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what} is empty: it has {rgb.shape[0]}x{rgb.shape[1]} pixels")
    return rgb


def rescale_and_normalize(
    image: np.ndarray, do_rescale: bool, rescale_factor: float | int, do_normalize: bool,
    image_mean: Sequence[float | int], image_std: Sequence[float | int],
) -> np.ndarray:
    """uint8 -> float32 like transformers' torchvision backend.

    Rescale alone is x * float32(factor); with normalisation both are fused into
    (x - mean / factor) / (std / factor), so the video path computes (x - 0) / 255 (docs/spec/processors.md §2 note).
    """
    x = image.astype(np.float32)
    if do_rescale and do_normalize:
        mean = np.asarray(image_mean, dtype=np.float32) * np.float32(1.0 / rescale_factor)
        std = np.asarray(image_std, dtype=np.float32) * np.float32(1.0 / rescale_factor)
        return (x - mean) / std
    if do_normalize:
        return (x - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
    if do_rescale:
        return x * np.float32(rescale_factor)
    return x


def patchify(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) -> patches [N, patch*patch*C] flattened (row, col, channel), raster order, and (x, y) positions.

    Equal to transformers' 16-px patchify followed by the 3x3 merge (docs/spec/processors.md §1.3).
    """
    h, w, c = image.shape
    rows, cols = h // patch, w // patch
    patches = image.reshape(rows, patch, cols, patch, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    return patches, np.stack([xs, ys], axis=-1)


def pad_patches(patches: np.ndarray, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    n = patches.shape[0]
    out = np.zeros((length, patches.shape[1]), dtype=patches.dtype)
    out[:n] = patches
    pos = np.full((length, 2), -1, dtype=np.int64)
    pos[:n] = positions
    return out, pos


def flatten_images(images: Any) -> list[ImageLike]:
    """A single image, a list of images or a nested list per sample -> flat list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


@dataclass
class ImageProcessor:
    """Gemma4UnifiedImageProcessor in NumPy. Defaults are the 12B checkpoint's (docs/spec/processors.md §0)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float | int = 1 / 255
    do_normalize: bool = False
    image_mean: Sequence[float | int] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: Sequence[float | int] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    resample: int = 3  # PIL BICUBIC; the only mode implemented

    def __post_init__(self) -> None:
        check_fields(vars(self), IMAGE_FIELDS, "ImageProcessor.")

    @classmethod
    def from_dict(cls, config: dict, where: str = "ImageProcessor.") -> "ImageProcessor":
        """The processor of a config section; each field is checked first, a bad one named with `where` (e.g.
        ".../processor_config.json: image_processor.") as a ProcessorConfigError."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        check_fields(values, IMAGE_FIELDS, where)
        return cls(**values)

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    def target_size(self, height: int, width: int, max_soft_tokens: int | None = None) -> tuple[int, int]:
        max_soft_tokens = self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens
        check_max_soft_tokens(max_soft_tokens)
        return aspect_ratio_preserving_size(
            height, width, self.patch_size, max_soft_tokens * self.pooling_kernel_size**2, self.pooling_kernel_size
        )

    def num_soft_tokens(self, height: int, width: int, max_soft_tokens: int | None = None) -> int:
        th, tw = self.target_size(height, width, max_soft_tokens)
        return (th // self.model_patch_size) * (tw // self.model_patch_size)

    def resize(self, rgb: np.ndarray, max_soft_tokens: int) -> np.ndarray:
        th, tw = self.target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens)
        if (th, tw) == rgb.shape[:2]:
            return rgb
        return resize_bicubic_antialias(rgb, th, tw)

    def process_frame(self, rgb: np.ndarray, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One RGB uint8 image -> (patches [S, 6912] f32, positions [S, 2] i64, number of real patches)."""
        if self.do_resize:
            rgb = self.resize(rgb, max_soft_tokens)
        pixels = rescale_and_normalize(
            rgb, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )
        h, w = pixels.shape[:2]
        if h % self.model_patch_size or w % self.model_patch_size:
            raise ValueError(f"image of {h}x{w} is not a multiple of {self.model_patch_size} px (do_resize=False?)")
        patches, positions = patchify(pixels, self.model_patch_size)
        if patches.shape[0] > max_soft_tokens:
            raise ValueError(f"image gives {patches.shape[0]} patches, more than max_soft_tokens={max_soft_tokens}")
        patches, positions = pad_patches(patches, positions, max_soft_tokens)
        n = int((positions[:, 0] >= 0).sum())
        return patches, positions, n

    def with_overrides(self, kwargs: dict, who: str) -> "ImageProcessor":
        """A copy with call-time keyword overrides of the config fields (validated again)."""
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names - _IGNORED_KWARGS
        if unknown:
            raise TypeError(f"{who}: unexpected keyword argument(s) {sorted(unknown)}")
        overrides = {k: v for k, v in kwargs.items() if k in names and v is not None}
        return replace(self, **overrides) if overrides else self

    def __call__(
        self, images: Any, max_soft_tokens: int | None = None, return_tensors: str | None = "np", **kwargs: Any
    ) -> BatchFeature:
        """Images (one, a list, or nested per sample; flattened in order) -> pixel_values [N, S, 6912],
        image_position_ids [N, S, 2] and num_soft_tokens_per_image (list of N ints)."""
        check_return_tensors(return_tensors)
        proc = self.with_overrides({**kwargs, "max_soft_tokens": max_soft_tokens}, "image processor")
        s = proc.max_soft_tokens
        pixel_values, position_ids, counts = [], [], []
        for i, image in enumerate(flatten_images(images)):
            rgb = to_rgb_array(image, what=f"image {i}")
            patches, positions, n = proc.process_frame(rgb, s)
            pixel_values.append(patches)
            position_ids.append(positions)
            counts.append(n)
        dim = proc.model_patch_size**2 * 3
        return BatchFeature(
            pixel_values=stack_or_empty(pixel_values, (s, dim), np.float32),
            image_position_ids=stack_or_empty(position_ids, (s, 2), np.int64),
            num_soft_tokens_per_image=counts,
        )

    preprocess = __call__


# Keywords transformers' processors accept that change nothing for numpy inputs on CPU.
_IGNORED_KWARGS = {"device", "input_data_format", "data_format", "return_metadata"}
