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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import PIL.Image
from jaxtyping import UInt8

from ..utils.files import FileMissingError, check_size, open_regular
from ._batch import BatchFeature, check_return_tensors, stack_or_empty
from .fields import boolean, check_fields, integer, number
from .files import MAX_VIDEO_BYTES
from .image import IMAGE_FIELDS, ImageProcessor, array_to_rgb

DEFAULT_FPS = 24.0  # what transformers assumes (with a warning) when the fps is unknown
MAX_VIDEO_FRAMES = 1_000_000  # frames a video file may have (counted or decoded)
MAX_KEPT_FRAMES = 10_000  # frames decoded into memory from one video (num_frames is at most this too)
MAX_FRAME_PIXELS = 89_478_485  # pixels of one frame: PIL's default decompression-bomb limit (1024 * 1024 * 1024 // 4 // 3)

# The checks of every VideoProcessor field: the image ones, and the sampling (the 12B: 32 frames, no fps).
VIDEO_FIELDS = {
    **IMAGE_FIELDS,
    "num_frames": integer(1, MAX_KEPT_FRAMES, nullable=True),
    "fps": number(0, 1000, lo_open=True, nullable=True),
    "do_sample_frames": boolean,
}


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


def load_video(
    path: str | os.PathLike,
    sample: Callable[[dict], Any] | None = None,
    max_bytes: int | None = MAX_VIDEO_BYTES,
) -> tuple[UInt8[np.ndarray, "frames height width 3"], dict]:
    """Decode a video file with PyAV (`pip install av`, the `video` extra) to RGB uint8 frames, and the metadata the
    video processor takes: total_num_frames, the stream's fps, width, height, duration.

    Without `sample`, every frame is decoded and kept (at most MAX_KEPT_FRAMES). With `sample`, a function of that
    metadata returning the (increasing) indices of the frames to keep, or None for every frame, only those frames
    are converted and kept, decoding stops after the last of them, and the metadata gains `frames_indices`. The frame
    count is the container's (as transformers reads it); a container without one has its packets counted (no
    decoding; at most MAX_VIDEO_FRAMES), and a count found too high while decoding is corrected and the frames
    sampled again.

    Only a regular file of at most `max_bytes` is read (else `FileReadError` naming it); frames of more than
    MAX_FRAME_PIXELS pixels are refused before they are converted."""
    try:
        import av
    except ImportError:
        raise ImportError(f"reading the video file {path} needs PyAV: pip install av (or gemma4-eqx[video])") from None
    name = os.fspath(path)
    if not os.path.lexists(name):
        raise FileMissingError(f"video file {name} not found")
    with open_regular(name, "a video file") as f:
        check_size(f, name, max_bytes, "a video file")
        try:
            with _open_container(av, f, name) as container:
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                fps = float(rate) if rate else None
                _check_frame_size(stream.codec_context.width or 0, stream.codec_context.height or 0, name)
                total = int(stream.frames or 0)
                if total <= 0:  # Matroska and others store no frame count: count the packets, decoding nothing
                    total = _count_packets(container, stream, name)
            for _ in range(2):  # a second pass only when decoding finds fewer frames than the container said
                meta = {"total_num_frames": total, "fps": fps, "duration": total / fps if fps else None,
                        "video_backend": "pyav"}
                wanted = None if sample is None else sample(dict(meta))
                wanted = None if wanted is None else _check_indices(wanted, total, name)
                with _open_container(av, f, name) as container:
                    frames, decoded, ended = _decode(container, container.streams.video[0], wanted, name)
                if wanted is None:
                    total = decoded  # every frame was decoded: the count is exact
                    break
                if not ended or decoded == total:
                    break
                total = decoded
            else:
                raise ValueError(f"{name}: the frame count changed between two decodings; expected a stable file")
        except av.FFmpegError as e:
            raise ValueError(f"{name}: PyAV cannot decode it ({e})") from e
    if total == 0 or not frames:
        raise ValueError(f"{name}: the video stream has no frames")
    if len({frame.shape for frame in frames}) > 1:
        raise ValueError(f"{name}: the frames change size ({sorted({fr.shape[:2] for fr in frames})}); expected one "
                         "size for the whole video")
    video = np.stack(frames)
    meta.update(total_num_frames=total, duration=total / fps if fps else None, height=video.shape[1],
                width=video.shape[2])
    if sample is not None:
        meta["frames_indices"] = list(range(total)) if wanted is None else [int(i) for i in wanted]
    return video, meta


def _open_container(av: Any, f: Any, name: str) -> Any:
    f.seek(0)
    try:
        container = av.open(f, mode="r")
    except av.FFmpegError as e:
        raise ValueError(f"{name}: PyAV cannot decode it ({e})") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name}: the file has no video stream")
    return container


def _check_frame_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise ValueError(f"{name}: frames of {width}x{height} pixels, more than the limit of {MAX_FRAME_PIXELS:,} "
                         "pixels per frame (PIL's decompression-bomb limit)")


def _count_packets(container: Any, stream: Any, name: str) -> int:
    count = 0
    for packet in container.demux(stream):
        if packet.size:  # the demuxer ends with an empty flush packet
            count += 1
            if count > MAX_VIDEO_FRAMES:
                raise ValueError(f"{name}: more than {MAX_VIDEO_FRAMES:,} frames, the limit of frames in a video file")
    return count


def _check_indices(indices: Any, total: int, name: str) -> np.ndarray:
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted.size and (np.any(np.diff(wanted) <= 0) or wanted[0] < 0 or wanted[-1] >= total):
        raise ValueError(f"{name}: frame indices to keep must increase within [0, {total}), got {wanted[:8].tolist()}...")
    if wanted.size > MAX_KEPT_FRAMES:
        raise ValueError(f"{name}: {wanted.size:,} frames asked for, more than the limit of {MAX_KEPT_FRAMES:,} frames "
                         "kept from one video; sample fewer (num_frames or fps)")
    return wanted


def _decode(container: Any, stream: Any, wanted: np.ndarray | None, name: str) -> tuple[list[np.ndarray], int, bool]:
    """The kept frames as RGB arrays, the number of frames decoded, and whether the stream ended (rather than
    decoding stopping after the last wanted frame)."""
    position = None if wanted is None else {int(j): k for k, j in enumerate(wanted)}
    last = None if wanted is None else (int(wanted[-1]) if wanted.size else -1)
    kept: list[np.ndarray] = []
    decoded = 0
    if last == -1:
        return kept, decoded, False
    for frame in container.decode(stream):
        index, decoded = decoded, decoded + 1
        if position is None or index in position:
            if len(kept) >= MAX_KEPT_FRAMES:
                raise ValueError(f"{name}: more than {MAX_KEPT_FRAMES:,} frames, the limit of frames kept from one "
                                 "video; sample them (num_frames or fps)")
            _check_frame_size(frame.width, frame.height, name)
            kept.append(frame.to_ndarray(format="rgb24"))
        if index == last:
            return kept, decoded, False
        if decoded >= MAX_VIDEO_FRAMES:
            raise ValueError(f"{name}: more than {MAX_VIDEO_FRAMES:,} frames, the limit of frames in a video file")
    return kept, decoded, True


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
        # num_frames and fps given at call time are checked where frames are sampled (sample_frame_indices).
        check_fields(vars(self), {k: v for k, v in VIDEO_FIELDS.items() if k not in ("num_frames", "fps")},
                     "VideoProcessor.")

    @classmethod
    def from_dict(cls, config: dict, where: str = "VideoProcessor.") -> "VideoProcessor":
        """The processor of a config section; each field is checked first, a bad one named with `where` (e.g.
        ".../processor_config.json: video_processor.") as a ProcessorConfigError."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        check_fields(values, VIDEO_FIELDS, where)
        return cls(**values)

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
        entries = self._metadata_entries(video_metadata, len(videos))
        file_meta: list[dict | None] = [None] * len(videos)
        for i, video in enumerate(videos):
            if isinstance(video, (str, os.PathLike)):
                videos[i], file_meta[i] = proc._load_sampled(video, entries[i], i)
        metas = self._metadata_list(videos, entries, file_meta)
        frame_proc = proc._frame_processor()
        pixel_values, position_ids, frames_per_video, tokens_per_video, out_meta = [], [], [], [], []
        for v, (video, meta) in enumerate(zip(videos, metas)):
            frames = _video_to_array(video, f"video {v}")
            total = meta.total_num_frames
            if file_meta[v] is not None:  # decoded from a file: already the sampled frames
                meta.frames_indices = file_meta[v]["frames_indices"]
            elif total != frames.shape[0]:
                raise ValueError(f"video {v}: video_metadata says {total} frames but the array has {frames.shape[0]}")
            elif proc.do_sample_frames:
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

    def _load_sampled(self, path: str | os.PathLike, entry: Any, index: int) -> tuple[np.ndarray, dict]:
        """Decode only the frames this processor samples from a video file (indices from the file's frame count and
        the fps, the caller's `entry` of video_metadata overriding the file's); the file's metadata, frames_indices
        included."""

        def choose(found: dict) -> Any:
            meta = self._merged_metadata(entry, found, found["total_num_frames"])
            if meta.total_num_frames != found["total_num_frames"]:
                raise ValueError(f"video {index}: video_metadata says {meta.total_num_frames} frames but the file "
                                 f"{os.fspath(path)} has {found['total_num_frames']}")
            if not self.do_sample_frames:
                return meta.frames_indices
            return sample_frame_indices(meta.total_num_frames, self.num_frames, self.fps, meta.fps)

        return load_video(path, sample=choose)

    @staticmethod
    def _metadata_entries(video_metadata: Any, count: int) -> list:
        if video_metadata is None:
            video_metadata = [{} for _ in range(count)]
        elif isinstance(video_metadata, (dict, VideoMetadata)):
            video_metadata = [video_metadata]
        if len(video_metadata) != count:
            raise ValueError(f"received {count} videos but {len(video_metadata)} video_metadata entries")
        return list(video_metadata)

    @staticmethod
    def _merged_metadata(meta: Any, found: dict | None, length: int) -> VideoMetadata:
        """The caller's metadata of one video; for a decoded file, the file's values fill what the caller left out."""
        if isinstance(meta, dict):
            given = {k: v for k, v in meta.items() if v is not None} if found else meta
            found = {k: v for k, v in (found or {}).items() if k != "frames_indices"}
            meta = {"total_num_frames": length, **found, **given}
        return VideoMetadata.from_any(meta)

    @staticmethod
    def _metadata_list(videos: list, video_metadata: Any, file_meta: list[dict | None] | None = None) -> list[VideoMetadata]:
        """The caller's metadata per video; for a decoded file, the file's values fill what the caller left out."""
        entries = VideoProcessor._metadata_entries(video_metadata, len(videos))
        metas = [VideoProcessor._merged_metadata(meta, found, len(video))
                 for video, meta, found in zip(videos, entries, file_meta or [None] * len(videos))]
        for i, meta in enumerate(metas):
            if meta.fps is None:
                warnings.warn(
                    f"video {i}: no fps in video_metadata; timestamps assume {DEFAULT_FPS:g} fps as transformers does",
                    stacklevel=3,
                )
        return metas
