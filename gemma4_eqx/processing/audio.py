"""Audio of Gemma 4 Unified (docs/spec/processors.md §3, §11.5): raw 16 kHz mono samples in 40 ms frames.

No mel spectrogram and no normalisation: a waveform of n samples becomes ceil(n / 640) frames of 640
raw samples (the last one zero padded), a batch is right padded on the frame axis to the longest clip,
and `input_features_mask` marks the real frames. `load_audio` reads wav/flac/ogg files with soundfile
and refuses another sample rate or several channels unless resampling / downmixing is asked for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..utils.files import check_size, open_regular
from ._batch import BatchFeature, check_return_tensors
from .fields import ProcessorConfigError, boolean, check_fields, integer, number, one_of
from .files import MAX_AUDIO_BYTES

SAMPLING_RATE = 16_000

# The checks of every AudioFeatureExtractor field (the 12B: 640, 640, 16000, 0.0, "right", true).
AUDIO_FIELDS = {
    "feature_size": integer(1, 1 << 16),
    "audio_samples_per_token": integer(1, 1 << 16),
    "sampling_rate": integer(1, 1_000_000),
    "padding_value": number(-1e6, 1e6),
    "padding_side": one_of("left", "right"),
    "return_attention_mask": boolean,
}


@dataclass
class AudioFeatureExtractor:
    """Gemma4UnifiedAudioFeatureExtractor in NumPy. Defaults are the 12B checkpoint's (docs/spec/processors.md §0)."""

    feature_size: int = 640
    audio_samples_per_token: int = 640
    sampling_rate: int = SAMPLING_RATE
    padding_value: float | int = 0.0
    padding_side: str = "right"
    return_attention_mask: bool = True

    def __post_init__(self) -> None:
        check_audio_fields(vars(self), "AudioFeatureExtractor.")

    @classmethod
    def from_dict(cls, config: dict, where: str = "AudioFeatureExtractor.") -> "AudioFeatureExtractor":
        """The extractor of a config section; each field is checked first, a bad one named with `where` (e.g.
        ".../processor_config.json: feature_extractor.") as a ProcessorConfigError."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        check_audio_fields(values, where)
        return cls(**values)

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.audio_samples_per_token)

    def frames(self, waveform: np.ndarray) -> np.ndarray:
        """1-D waveform -> [ceil(n / 640), 640] float32, zero padded at the end."""
        n = waveform.shape[0]
        size = self.audio_samples_per_token
        out = np.zeros((self.num_frames(n) * size,), dtype=np.float32)
        out[:n] = waveform
        return out.reshape(-1, size)

    def __call__(
        self,
        raw_speech: Any,
        padding: bool | str = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        sampling_rate: int | None = None,
        return_tensors: str | None = "np",
        **kwargs: Any,
    ) -> BatchFeature:
        """Waveforms -> input_features [B, T_max, 640] float32 and input_features_mask [B, T_max] bool.

        padding: "longest" (or True) pads to the longest clip; "max_length" pads to max_length frames;
        False / "do_not_pad" requires equal lengths. truncation cuts clips to max_length frames.
        """
        check_return_tensors(return_tensors)
        unknown = set(kwargs) - {"return_attention_mask", "device"}
        if unknown:
            raise TypeError(f"audio feature extractor: unexpected keyword argument(s) {sorted(unknown)}")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio was given at {sampling_rate} Hz but the model takes {self.sampling_rate} Hz; resample it "
                f"first, e.g. load_audio(path, resample=True) or resample_audio(x, {sampling_rate}, {self.sampling_rate})"
            )
        clips = [self.frames(w) for w in as_waveform_list(raw_speech)]
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length (in 640-sample frames)")
            clips = [c[:max_length] for c in clips]
        lengths = [c.shape[0] for c in clips]
        if padding in (True, "longest"):
            target = max(lengths, default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length (in 640-sample frames)')
            target = max_length
            if max(lengths, default=0) > target:
                raise ValueError(f"a clip has {max(lengths)} frames, more than max_length={target}; pass truncation=True")
        elif padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError(f"clips of different lengths {lengths} cannot be stacked without padding")
            target = max(lengths, default=0)
        else:
            raise ValueError(f'padding must be "longest", "max_length", True or False, got {padding!r}')

        features = np.full((len(clips), target, self.feature_size), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(clips), target), dtype=bool)
        for i, clip in enumerate(clips):
            n = clip.shape[0]
            if self.padding_side == "left":
                features[i, target - n:], mask[i, target - n:] = clip, True
            else:
                features[i, :n], mask[i, :n] = clip, True
        return BatchFeature(input_features=features, input_features_mask=mask)


def check_audio_fields(values: dict, where: str) -> None:
    check_fields(values, AUDIO_FIELDS, where)
    size = values.get("feature_size", 640)
    per_token = values.get("audio_samples_per_token", 640)
    if size != per_token:  # each frame of audio_samples_per_token raw samples is one feature vector
        raise ProcessorConfigError(f"{where}feature_size must equal audio_samples_per_token ({per_token}), got {size}")


def as_waveform_list(raw_speech: Any) -> list[np.ndarray]:
    """One 1-D waveform, a list of floats, or a list of waveforms -> list of 1-D float32 arrays."""
    if isinstance(raw_speech, np.ndarray):
        if raw_speech.ndim == 1:
            return [_as_mono(raw_speech, 0)]
        raise ValueError(
            f"audio: expected a 1-D mono waveform (or a list of them), got an array of shape {raw_speech.shape}; "
            "downmix several channels with x.mean(axis=channel_axis) or load_audio(path, downmix=True)"
        )
    if isinstance(raw_speech, (list, tuple)):
        if raw_speech and all(isinstance(x, (int, float, np.floating, np.integer)) for x in raw_speech):
            return [_as_mono(np.asarray(raw_speech, dtype=np.float64), 0)]
        return [_as_mono(np.asarray(w), i) for i, w in enumerate(raw_speech)]
    raise TypeError(f"audio: expected numpy waveforms, got {type(raw_speech).__name__}")


def _as_mono(waveform: np.ndarray, index: int) -> np.ndarray:
    if waveform.ndim != 1:
        raise ValueError(
            f"audio {index}: expected a 1-D mono waveform, got shape {waveform.shape}; downmix several "
            "channels with x.mean(axis=channel_axis) or load_audio(path, downmix=True)"
        )
    if waveform.dtype.type in PCM_SCALE:
        # Integer PCM samples, scaled to [-1, 1) as soundfile (transformers' audio loader) reads them from a file.
        offset, scale = PCM_SCALE[waveform.dtype.type]
        return ((waveform.astype(np.float64) - offset) / scale).astype(np.float32)
    if not np.issubdtype(waveform.dtype, np.floating):
        raise TypeError(f"audio {index}: expected float samples in [-1, 1] or integer PCM samples "
                        f"(int8, uint8, int16, int32), got dtype {waveform.dtype}")
    if not np.isfinite(waveform).all():
        bad = int((~np.isfinite(waveform)).sum())
        raise ValueError(f"audio {index}: {bad} of {waveform.size} samples are NaN or infinite; expected finite samples")
    return waveform.astype(np.float32, copy=False)


# dtype -> (offset, divisor) taking PCM samples to [-1, 1): libsndfile's integer-to-float conversion.
PCM_SCALE = {np.int8: (0, 2.0**7), np.uint8: (128, 2.0**7), np.int16: (0, 2.0**15), np.int32: (0, 2.0**31)}


def load_audio(
    path: str | os.PathLike,
    sampling_rate: int = SAMPLING_RATE,
    resample: bool = False,
    downmix: bool = False,
    max_bytes: int | None = MAX_AUDIO_BYTES,
) -> np.ndarray:
    """Read an audio file (wav, flac, ogg, ... via soundfile) as float32 mono at `sampling_rate`.

    A file at another rate raises unless resample=True (then `resample_audio` converts it); a file with
    several channels raises unless downmix=True (then the channels are averaged). Only a regular file of at most
    `max_bytes` is read (else `FileReadError` naming it); a file without samples or that soundfile cannot read is a
    ValueError naming the file.
    """
    import soundfile

    with open_regular(path, "an audio file") as f:
        check_size(f, path, max_bytes, "an audio file")
        try:
            data, file_rate = soundfile.read(f, dtype="float32", always_2d=True)  # [samples, channels]
        except (RuntimeError, TypeError, ValueError) as e:  # soundfile.LibsndfileError is a RuntimeError
            raise ValueError(f"{os.fspath(path)}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{os.fspath(path)}: the audio file holds no samples; expected at least one")
    if data.shape[1] > 1:
        if not downmix:
            raise ValueError(
                f"{path}: the audio has {data.shape[1]} channels but the model takes mono; "
                "pass downmix=True to average the channels"
            )
        data = data.mean(axis=1, keepdims=True)
    waveform = data[:, 0]
    if file_rate != sampling_rate:
        if not resample:
            raise ValueError(
                f"{path}: the audio is sampled at {file_rate} Hz but the model takes {sampling_rate} Hz; "
                "pass resample=True to convert it"
            )
        waveform = resample_audio(waveform, file_rate, sampling_rate)
    return waveform.astype(np.float32, copy=False)


def resample_audio(waveform: np.ndarray, orig_rate: int, target_rate: int, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling by a polyphase windowed-sinc filter (the method of scipy's resample_poly).

    The ratio target/orig is reduced to up/down = L/M. Output sample n sits at input time t = n * M / L;
    it is the sum of the input around floor(t) weighted by a sinc low-pass at min(1, L/M) of the Nyquist
    rate (so downsampling does not alias), tapered by a Kaiser window (beta 8.6) over `zero_crossings`
    zero crossings each side. There are only L distinct fractional offsets, so the L filters are
    computed once, each normalised to unit gain at DC. Output length is ceil(n * L / M). Not bit-identical to librosa/soxr.
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {target_rate}")
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample_audio takes a 1-D waveform, got shape {x.shape}")
    g = math.gcd(orig_rate, target_rate)
    up, down = target_rate // g, orig_rate // g
    if up == down:
        return x.astype(np.float32)
    cutoff = min(1.0, up / down)  # fraction of the input Nyquist rate that is kept
    half = int(math.ceil(zero_crossings / cutoff))  # taps each side, in input samples
    taps = np.arange(-half + 1, half + 1)  # offsets relative to floor(t)
    phases = np.arange(up) * down % up / up  # fractional part of t for each phase
    dist = phases[:, None] - taps[None, :]  # t - tap position
    window = np.kaiser(2 * half + 1, 8.6)
    window_at = np.interp(dist, np.arange(-half, half + 1), window, left=0.0, right=0.0)
    filters = cutoff * np.sinc(cutoff * dist) * window_at  # [up, 2 * half]
    filters /= filters.sum(axis=1, keepdims=True)  # unit DC gain for every phase

    n_out = -(-x.shape[0] * up // down)
    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    out = np.empty(n_out)
    chunk = 1 << 15
    for start in range(0, n_out, chunk):
        n = np.arange(start, min(start + chunk, n_out))
        base = n * down // up
        phase = n % up
        idx = base[:, None] + taps[None, :] + half
        out[start:start + n.shape[0]] = np.einsum("ij,ij->i", padded[idx], filters[phase])
    return out.astype(np.float32)
