"""Video processor of Gemma 4 Unified (docs/spec/processors.md §2, §11.1, §11.6).

Takes decoded frames (uint8 [T, H, W, C] per video) and their metadata (fps). Samples
`arange(N) * T // N` with N = num_frames (32), processes every sampled frame like an image with
max_soft_tokens = 70, and concatenates the frames of all videos: pixel_values_videos
[total_frames, 70, 6912], video_position_ids [total_frames, 70, 2], num_frames_per_video.
The prompt text for each video (`MM:SS <|image>` + soft tokens + `<image|>` per frame) is built by
`Processor` from `num_soft_tokens_per_video` and the `video_metadata` returned here.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields, replace
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from jaxtyping import UInt8

from ._batch import BatchFeature, check_return_tensors, stack_or_empty
from .image import ImageProcessor, array_to_rgb, check_max_soft_tokens

DEFAULT_FPS = 24.0  # what transformers assumes (with a warning) when the fps is unknown


@dataclass
class VideoMetadata:
    """What the prompt builder needs: the fps and the indices of the frames that were kept."""

    total_num_frames: int
    fps: float | int | None = None
    frames_indices: list[int] | None = None
    width: int | None = None
    height: int | None = None
    duration: float | int | None = None
    video_backend: str | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and (isinstance(self.fps, bool) or not math.isfinite(self.fps) or self.fps <= 0):
            raise ValueError(f"video_metadata fps={self.fps!r}: expected a positive number of frames per second "
                             "(or None, which assumes 24 as transformers does)")

    @classmethod
    def from_any(cls, meta: Any) -> "VideoMetadata":
        if isinstance(meta, VideoMetadata):
            return replace(meta)
        if isinstance(meta, dict):
            names = {f.name for f in fields(cls)}
            unknown = set(meta) - names
            if unknown:
                raise ValueError(f"video_metadata: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
            return cls(**meta)
        raise TypeError(f"video_metadata entries must be dicts or VideoMetadata, got {type(meta).__name__}")

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each kept frame: frame_index / fps."""
        fps = DEFAULT_FPS if self.fps is None else self.fps
        indices = range(self.total_num_frames) if self.frames_indices is None else self.frames_indices
        return [int(i) / fps for i in indices]


def timestamp_strings(seconds: Sequence[float | int]) -> list[str]:
    """MM:SS with truncation, both zero padded (docs/spec/processors.md §2)."""
    return [f"{int(s // 60):02d}:{int(s % 60):02d}" for s in seconds]


def sample_frame_indices(
    total: int, num_frames: int | None, fps: float | int | None, video_fps: float | int | None
) -> np.ndarray:
    """transformers' default sampling: N uniformly spaced frames, arange(N) * T // N in integers."""
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive: pass only one of them")
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames={num_frames!r}: expected a whole number of frames >= 1 (or None with fps=...)")
    if fps is not None and (isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0):
        raise ValueError(f"fps={fps!r}: expected a positive sampling rate in frames per second")
    if num_frames is None and fps is not None:
        if video_fps is None:
            raise ValueError("sampling by fps needs the video's own fps in video_metadata")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        return np.arange(total, dtype=np.int64)
    if num_frames > total:
        raise ValueError(
            f"cannot sample num_frames={num_frames} frames from a video of {total} frames; "
            "pass num_frames (or fps) small enough, or do_sample_frames=False to keep every frame"
        )
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def load_video(path: str | os.PathLike) -> tuple[UInt8[np.ndarray, "frames height width 3"], dict]:
    """Decode every frame of a video file with PyAV (`pip install av`, the `video` extra) to RGB uint8, and the
    metadata the video processor takes: total_num_frames, the stream's fps, width, height, duration."""
    try:
        import av
    except ImportError:
        raise ImportError(f"reading the video file {path} needs PyAV: pip install av (or gemma4-eqx[video])") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path} not found")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.FFmpegError as e:
        raise ValueError(f"{path}: PyAV cannot decode it ({e})") from e
    if not frames:
        raise ValueError(f"{path}: the video stream has no frames")
    fps = float(rate) if rate else None
    video = np.stack(frames)
    meta = {"total_num_frames": len(frames), "fps": fps, "height": video.shape[1], "width": video.shape[2],
            "duration": len(frames) / fps if fps else None, "video_backend": "pyav"}
    return video, meta


def _video_to_array(video: Any, what: str) -> np.ndarray:
    """[T, H, W, C] uint8 array, or a list of frames (PIL images / [H, W, C] arrays) -> [T, H, W, 3] uint8."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{what} has no frames")
        frames = [np.asarray(f.convert("RGB")) if isinstance(f, PIL.Image.Image) else array_to_rgb(np.asarray(f), what)
                  for f in video]
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"{what}: all frames must have the same size, got {sorted({f.shape for f in frames})}")
        return np.stack(frames)
    if not isinstance(video, np.ndarray):
        raise TypeError(f"{what}: expected a uint8 array [T, H, W, C] or a list of frames, got {type(video).__name__}")
    if video.ndim != 4:
        raise ValueError(f"{what}: expected a video array of shape [T, H, W, C], got {video.shape}")
    if video.shape[0] == 0:
        raise ValueError(f"{what} has no frames")
    if video.shape[-1] == 3 and video.dtype == np.uint8:
        return video
    return np.stack([array_to_rgb(frame, what) for frame in video])


def batch_videos(videos: Any) -> list[Any]:
    """One video (4-D array or list of frames) or a list of videos -> list of videos."""
    if isinstance(videos, np.ndarray):
        return [videos]
    if isinstance(videos, (list, tuple)) and videos and not (
        isinstance(videos[0], PIL.Image.Image) or (isinstance(videos[0], np.ndarray) and videos[0].ndim == 3)
    ):
        return list(videos)
    return [videos]


@dataclass
class VideoProcessor:
    """Gemma4UnifiedVideoProcessor in NumPy. Defaults are the 12B checkpoint's (docs/spec/processors.md §0)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 70
    num_frames: int | None = 32
    fps: float | int | None = None
    do_sample_frames: bool = True
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float | int = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float | int] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: Sequence[float | int] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    resample: int = 3

    def __post_init__(self) -> None:
        check_max_soft_tokens(self.max_soft_tokens)

    @classmethod
    def from_dict(cls, config: dict) -> "VideoProcessor":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def _frame_processor(self) -> ImageProcessor:
        return ImageProcessor(
            patch_size=self.patch_size, pooling_kernel_size=self.pooling_kernel_size,
            max_soft_tokens=self.max_soft_tokens, do_resize=self.do_resize, do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
            image_mean=list(self.image_mean), image_std=list(self.image_std), resample=self.resample,
        )

    def __call__(
        self, videos: Any, video_metadata: Any = None, return_tensors: str | None = "np", **kwargs: Any
    ) -> BatchFeature:
        check_return_tensors(return_tensors)
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names - {"device", "input_data_format", "return_metadata"}
        if unknown:
            raise TypeError(f"video processor: unexpected keyword argument(s) {sorted(unknown)}")
        if "fps" in kwargs and kwargs["fps"] is not None and "num_frames" not in kwargs:
            kwargs["num_frames"] = None  # fps given at call time replaces the default frame count
        overrides = {k: v for k, v in kwargs.items() if k in names and (v is not None or k in ("num_frames", "fps"))}
        proc = replace(self, **overrides) if overrides else self

        videos = batch_videos(videos)
        file_meta: list[dict | None] = [None] * len(videos)
        for i, video in enumerate(videos):
            if isinstance(video, (str, os.PathLike)):
                videos[i], file_meta[i] = load_video(video)
        metas = self._metadata_list(videos, video_metadata, file_meta)
        frame_proc = proc._frame_processor()
        pixel_values, position_ids, frames_per_video, tokens_per_video, out_meta = [], [], [], [], []
        for v, (video, meta) in enumerate(zip(videos, metas)):
            frames = _video_to_array(video, f"video {v}")
            total = meta.total_num_frames
            if total != frames.shape[0]:
                raise ValueError(f"video {v}: video_metadata says {total} frames but the array has {frames.shape[0]}")
            if proc.do_sample_frames:
                indices = sample_frame_indices(total, proc.num_frames, proc.fps, meta.fps)
                frames = frames[indices]
                meta.frames_indices = [int(i) for i in indices]
            elif meta.frames_indices is None:
                meta.frames_indices = list(range(total))
            counts = set()
            for frame in frames:
                if frame.shape[0] == 0 or frame.shape[1] == 0:
                    raise ValueError(f"video {v} is empty: frames of {frame.shape[0]}x{frame.shape[1]} pixels")
                patches, positions, n = frame_proc.process_frame(frame, proc.max_soft_tokens)
                pixel_values.append(patches)
                position_ids.append(positions)
                counts.add(n)
            frames_per_video.append(len(frames))
            tokens_per_video.append(counts.pop())
            out_meta.append(meta)
        dim = frame_proc.model_patch_size**2 * 3
        return BatchFeature(
            pixel_values_videos=stack_or_empty(pixel_values, (proc.max_soft_tokens, dim), np.float32),
            video_position_ids=stack_or_empty(position_ids, (proc.max_soft_tokens, 2), np.int64),
            num_frames_per_video=frames_per_video,
            num_soft_tokens_per_video=tokens_per_video,
            video_metadata=out_meta,
        )

    preprocess = __call__

    @staticmethod
    def _metadata_list(videos: list, video_metadata: Any, file_meta: list[dict | None] | None = None) -> list[VideoMetadata]:
        """The caller's metadata per video; for a decoded file, the file's values fill what the caller left out."""
        if video_metadata is None:
            video_metadata = [{} for _ in videos]
        elif isinstance(video_metadata, (dict, VideoMetadata)):
            video_metadata = [video_metadata]
        if len(video_metadata) != len(videos):
            raise ValueError(f"received {len(videos)} videos but {len(video_metadata)} video_metadata entries")
        metas = []
        for video, meta, found in zip(videos, video_metadata, file_meta or [None] * len(videos)):
            if isinstance(meta, dict):
                given = {k: v for k, v in meta.items() if v is not None} if found else meta
                meta = {"total_num_frames": len(video), **(found or {}), **given}
            metas.append(VideoMetadata.from_any(meta))
        for i, meta in enumerate(metas):
            if meta.fps is None:
                warnings.warn(
                    f"video {i}: no fps in video_metadata; timestamps assume {DEFAULT_FPS:g} fps as transformers does",
                    stacklevel=3,
                )
        return metas
