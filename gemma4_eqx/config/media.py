"""The vision and audio embedders' configurations (transformers' `Gemma4UnifiedVisionConfig`,
`Gemma4UnifiedAudioConfig`). Spec (docs/spec/decoder-and-checkpoint.md): §1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .fields import (
    as_number,
    fail,
    field_default,
    is_int,
    read_choice,
    read_float,
    read_int,
)

MAX_SOFT_TOKENS_CHOICES = (70, 140, 280, 560, 1120)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default (docs/spec/decoder-and-checkpoint.md §2.4 a); not serialized by HF
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                fail(f"vision_config.{name}", f"expected a positive integer, found {value!r}")
        for name in ("rms_norm_eps", "layer_norm_eps"):
            value = getattr(self, name)
            if as_number(value) is None or value <= 0:
                fail(f"vision_config.{name}", f"expected a finite number > 0, found {value!r}")
        if self.mm_embed_dim != self.output_proj_dims:
            fail("vision_config.output_proj_dims", f"must equal mm_embed_dim={self.mm_embed_dim} "
                  f"(the pre-projection norm runs over the patch embedding), found {self.output_proj_dims}")

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        p = "vision_config"
        read_choice(d, "model_type", p, ("gemma4_unified_vision",), "gemma4_unified_vision")
        patch_size = read_int(d, "patch_size", p)
        pooling = read_int(d, "pooling_kernel_size", p)
        if "model_patch_size" in d and read_int(d, "model_patch_size", p) != patch_size * pooling:
            fail(f"{p}.model_patch_size",
                  f"expected patch_size*pooling_kernel_size = {patch_size * pooling}, found {d['model_patch_size']}")
        mm_embed_dim = read_int(d, "mm_embed_dim", p)
        return cls(patch_size=patch_size, pooling_kernel_size=pooling, mm_embed_dim=mm_embed_dim,
                   mm_posemb_size=read_int(d, "mm_posemb_size", p),
                   output_proj_dims=read_int(d, "output_proj_dims", p, mm_embed_dim),
                   rms_norm_eps=read_float(d, "rms_norm_eps", p, maximum=1.0),
                   initializer_range=read_float(d, "initializer_range", p, field_default(cls, "initializer_range"),
                                            positive=False))

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gemma4_unified_vision", "patch_size": self.patch_size,
                "pooling_kernel_size": self.pooling_kernel_size, "mm_embed_dim": self.mm_embed_dim,
                "mm_posemb_size": self.mm_posemb_size, "output_proj_dims": self.output_proj_dims,
                "rms_norm_eps": self.rms_norm_eps, "initializer_range": self.initializer_range}


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int = 640  # = samples per soft token (40 ms at 16 kHz)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not is_int(self.audio_embed_dim) or self.audio_embed_dim <= 0:
            fail("audio_config.audio_embed_dim", f"expected a positive integer, found {self.audio_embed_dim!r}")
        if as_number(self.rms_norm_eps) is None or self.rms_norm_eps <= 0:
            fail("audio_config.rms_norm_eps", f"expected a finite number > 0, found {self.rms_norm_eps!r}")

    @property
    def samples_per_token(self) -> int:
        return self.audio_embed_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> AudioConfig:
        p = "audio_config"
        read_choice(d, "model_type", p, ("gemma4_unified_audio",), "gemma4_unified_audio")
        key = "audio_embed_dim" if "audio_embed_dim" in d or "hidden_size" not in d else "hidden_size"
        dim = read_int(d, key, p)
        for alias in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            if alias in d and read_int(d, alias, p) != dim:
                fail(f"{p}.{alias}", f"must equal audio_embed_dim={dim}, found {d[alias]}")
        return cls(audio_embed_dim=dim, rms_norm_eps=read_float(d, "rms_norm_eps", p, maximum=1.0),
                   initializer_range=read_float(d, "initializer_range", p, field_default(cls, "initializer_range"),
                                            positive=False))

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gemma4_unified_audio", "audio_embed_dim": self.audio_embed_dim,
                "rms_norm_eps": self.rms_norm_eps, "initializer_range": self.initializer_range}
