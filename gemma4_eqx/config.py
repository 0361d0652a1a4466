"""Configuration: frozen dataclasses read from and written back to a transformers `config.json`.

The field names are transformers' (`Gemma4UnifiedTextConfig`, `...VisionConfig`, `...AudioConfig`,
`Gemma4UnifiedConfig`), so a reader can hold this file against the checkpoint's JSON line by line.
Spec: `decoder-and-checkpoint.md` §1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
MAX_SOFT_TOKENS_CHOICES = (70, 140, 280, 560, 1120)


class ConfigError(ValueError):
    """A config.json that does not describe a model this package can build."""


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One RoPE schedule (spec §4). `proportional` rotates only `partial_rotary_factor` of the dims."""

    rope_type: Literal["default", "proportional"] = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], field: str) -> RopeConfig:
        rope_type = d.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            _fail(f"{field}.rope_type", f"expected 'default' or 'proportional', found {rope_type!r}")
        factor = d.get("factor", 1.0)
        if factor not in (None, 1.0):
            _fail(f"{field}.factor", f"RoPE scaling is not used by Gemma 4; expected 1.0, found {factor}")
        prf = float(d.get("partial_rotary_factor", 1.0))
        if not 0.0 < prf <= 1.0:
            _fail(f"{field}.partial_rotary_factor", f"expected a value in (0, 1], found {prf}")
        return cls(rope_type=rope_type, rope_theta=float(d["rope_theta"]), partial_rotary_factor=prf)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "proportional":
            d["partial_rotary_factor"] = self.partial_rotary_factor
        return d


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What differs between a sliding and a full attention layer (spec §1.1, derived table)."""

    layer_type: str
    num_key_value_heads: int
    head_dim: int
    has_v_proj: bool  # False on full layers when attention_k_eq_v: values are the raw keys
    sliding_window: int | None
    rope: RopeConfig


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15_360
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 1
    attention_k_eq_v: bool = True
    sliding_window: int = 1024
    layer_types: tuple[str, ...] = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(48))
    rope_sliding: RopeConfig = RopeConfig("default", 10_000.0)
    rope_full: RopeConfig = RopeConfig("proportional", 1_000_000.0, 0.25)
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    use_bidirectional_attention: str | None = "vision"
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
                     "sliding_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"text_config.{name}", f"expected a positive integer, found {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            _fail("text_config.layer_types",
                  f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                _fail(f"text_config.layer_types[{i}]", f"expected one of {LAYER_TYPES}, found {t!r}")
        for t in set(self.layer_types):
            g = self.layer_geometry_for_type(t)
            if self.num_attention_heads % g.num_key_value_heads:
                field = "num_key_value_heads" if t == SLIDING else "num_global_key_value_heads"
                _fail(f"text_config.{field}", f"{g.num_key_value_heads} does not divide "
                      f"num_attention_heads={self.num_attention_heads}")
            if g.head_dim % 2:
                _fail("text_config.head_dim" if t == SLIDING else "text_config.global_head_dim",
                      f"RoPE needs an even head dimension, found {g.head_dim}")
        if self.hidden_activation not in ("gelu_pytorch_tanh",):
            _fail("text_config.hidden_activation",
                  f"expected 'gelu_pytorch_tanh', found {self.hidden_activation!r}")
        if self.use_bidirectional_attention not in (None, "vision"):
            _fail("text_config.use_bidirectional_attention",
                  f"expected 'vision' or null, found {self.use_bidirectional_attention!r}"
                  " ('all' is a different model family and is not supported)")
        if not self.tie_word_embeddings:
            _fail("text_config.tie_word_embeddings", "Gemma 4 ties the lm head to the embedding; found false")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            _fail("text_config.final_logit_softcapping",
                  f"expected a positive number or null, found {self.final_logit_softcapping}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            _fail("text_config.pad_token_id", f"{self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived geometry -------------------------------------------------------------------
    def layer_geometry_for_type(self, layer_type: str) -> LayerGeometry:
        if layer_type == SLIDING:
            return LayerGeometry(SLIDING, self.num_key_value_heads, self.head_dim, True,
                                 self.sliding_window, self.rope_sliding)
        kv = self.num_key_value_heads
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            kv = self.num_global_key_value_heads
        return LayerGeometry(FULL, kv, self.global_head_dim, not self.attention_k_eq_v, None, self.rope_full)

    def layer_geometry(self, layer_idx: int) -> LayerGeometry:
        return self.layer_geometry_for_type(self.layer_types[layer_idx])

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ---- HF round trip ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> TextConfig:
        model_type = d.get("model_type", "gemma4_unified_text")
        if model_type not in ("gemma4_unified_text", "gemma4_text"):
            _fail("text_config.model_type", f"expected 'gemma4_unified_text', found {model_type!r}")
        for key in ("enable_moe_block",):
            if d.get(key):
                _fail(f"text_config.{key}", "mixture-of-experts Gemma 4 variants are not supported")
        if d.get("num_kv_shared_layers", 0):
            _fail("text_config.num_kv_shared_layers",
                  f"expected 0 (the 12B shares no KV), found {d['num_kv_shared_layers']}")
        if d.get("hidden_size_per_layer_input", 0):
            _fail("text_config.hidden_size_per_layer_input", "per-layer inputs are not part of gemma4_unified")
        if d.get("attention_bias", False):
            _fail("text_config.attention_bias", "expected false: Gemma 4 attention has no biases")
        if d.get("use_double_wide_mlp", False):
            _fail("text_config.use_double_wide_mlp", "expected false (only KV-shared layers use it)")
        n_layers = int(d.get("num_hidden_layers", 30))
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' rule: every 6th layer full, the last forced full
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
            if layer_types:
                layer_types[-1] = FULL
        k_eq_v = bool(d.get("attention_k_eq_v", False))
        head_dim = int(d.get("head_dim", 256))
        global_head_dim = d.get("global_head_dim")
        num_global_kv = d.get("num_global_key_value_heads")
        per_layer = d.get("per_layer_config")
        if per_layer:  # the spelling transformers >= 5.2x writes: {"05": {"head_dim": 512, ...}, ...}
            overrides = {}
            for key, value in per_layer.items():
                try:
                    idx = int(key)
                except ValueError:
                    _fail(f"text_config.per_layer_config[{key!r}]", "expected a layer index as key")
                if not 0 <= idx < n_layers:
                    _fail(f"text_config.per_layer_config[{key!r}]", f"layer index outside [0, {n_layers})")
                if layer_types[idx] != FULL:
                    _fail(f"text_config.per_layer_config[{key!r}]",
                          f"overrides layer {idx}, which is {layer_types[idx]!r}; only full layers may differ")
                overrides[idx] = (int(value.get("head_dim", head_dim)),
                                  value.get("num_key_value_heads"))
            distinct = set(overrides.values())
            if len(distinct) > 1:
                _fail("text_config.per_layer_config", f"full layers disagree on their geometry: {sorted(distinct, key=str)}")
            missing = [i for i, t in enumerate(layer_types) if t == FULL and i not in overrides]
            if missing and distinct:
                _fail("text_config.per_layer_config", f"full layers {missing} have no entry")
            if distinct:
                (gdim, gkv), = distinct
                if global_head_dim is not None and int(global_head_dim) != gdim:
                    _fail("text_config.global_head_dim",
                          f"{global_head_dim} contradicts per_layer_config head_dim {gdim}")
                global_head_dim = gdim
                if gkv is not None:
                    num_global_kv = int(gkv)
        if global_head_dim is None:
            global_head_dim = 512
        rope = d.get("rope_parameters") or {}
        rope_sliding = RopeConfig.from_hf_dict(
            rope.get(SLIDING, {"rope_type": "default", "rope_theta": 10_000.0}),
            "text_config.rope_parameters.sliding_attention")
        rope_full = RopeConfig.from_hf_dict(
            rope.get(FULL, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}),
            "text_config.rope_parameters.full_attention")
        eos = d.get("eos_token_id", 1)
        return cls(
            vocab_size=int(d.get("vocab_size", 262_144)),
            hidden_size=int(d.get("hidden_size", 2304)),
            intermediate_size=int(d.get("intermediate_size", 9216)),
            num_hidden_layers=n_layers,
            num_attention_heads=int(d.get("num_attention_heads", 8)),
            num_key_value_heads=int(d.get("num_key_value_heads", 4)),
            head_dim=head_dim,
            global_head_dim=int(global_head_dim),
            num_global_key_value_heads=None if num_global_kv is None else int(num_global_kv),
            attention_k_eq_v=k_eq_v,
            sliding_window=int(d.get("sliding_window", 1024)),
            layer_types=tuple(layer_types),
            rope_sliding=rope_sliding,
            rope_full=rope_full,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            use_bidirectional_attention=d.get("use_bidirectional_attention", "vision"),
            max_position_embeddings=int(d.get("max_position_embeddings", 262_144)),
            pad_token_id=int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0),
            bos_token_id=int(d.get("bos_token_id", 2) if d.get("bos_token_id") is not None else 2),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        full = self.layer_geometry_for_type(FULL)
        width = max(2, len(str(self.num_hidden_layers - 1)))
        per_layer = {f"{i:0{width}d}": {"head_dim": full.head_dim, "num_key_value_heads": full.num_key_value_heads}
                     for i, t in enumerate(self.layer_types) if t == FULL}
        return {
            "model_type": "gemma4_unified_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "per_layer_config": per_layer,
            "attention_k_eq_v": self.attention_k_eq_v,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {SLIDING: self.rope_sliding.to_hf_dict(), FULL: self.rope_full.to_hf_dict()},
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": self.hidden_activation,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_bidirectional_attention": self.use_bidirectional_attention,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_kv_shared_layers": 0,
            "use_double_wide_mlp": False,
        }


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default (spec §2.4 a); not serialized by HF
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                _fail(f"vision_config.{name}", f"expected a positive integer, found {value!r}")
        if self.mm_embed_dim != self.output_proj_dims:
            _fail("vision_config.output_proj_dims", f"must equal mm_embed_dim={self.mm_embed_dim} "
                  f"(the pre-projection norm runs over the patch embedding), found {self.output_proj_dims}")

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        model_type = d.get("model_type", "gemma4_unified_vision")
        if model_type != "gemma4_unified_vision":
            _fail("vision_config.model_type", f"expected 'gemma4_unified_vision', found {model_type!r}")
        patch_size = int(d.get("patch_size", 16))
        pooling = int(d.get("pooling_kernel_size", 3))
        if "model_patch_size" in d and int(d["model_patch_size"]) != patch_size * pooling:
            _fail("vision_config.model_patch_size",
                  f"expected patch_size*pooling_kernel_size = {patch_size * pooling}, found {d['model_patch_size']}")
        return cls(patch_size=patch_size, pooling_kernel_size=pooling,
                   mm_embed_dim=int(d.get("mm_embed_dim", 3840)), mm_posemb_size=int(d.get("mm_posemb_size", 1120)),
                   output_proj_dims=int(d.get("output_proj_dims", d.get("mm_embed_dim", 3840))),
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   initializer_range=float(d.get("initializer_range", 0.02)))

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
        if not isinstance(self.audio_embed_dim, int) or self.audio_embed_dim <= 0:
            _fail("audio_config.audio_embed_dim", f"expected a positive integer, found {self.audio_embed_dim!r}")

    @property
    def samples_per_token(self) -> int:
        return self.audio_embed_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> AudioConfig:
        model_type = d.get("model_type", "gemma4_unified_audio")
        if model_type != "gemma4_unified_audio":
            _fail("audio_config.model_type", f"expected 'gemma4_unified_audio', found {model_type!r}")
        dim = d.get("audio_embed_dim", d.get("hidden_size", 640))
        for alias in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            if alias in d and int(d[alias]) != int(dim):
                _fail(f"audio_config.{alias}", f"must equal audio_embed_dim={dim}, found {d[alias]}")
        return cls(audio_embed_dim=int(dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   initializer_range=float(d.get("initializer_range", 0.02)))

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gemma4_unified_audio", "audio_embed_dim": self.audio_embed_dim,
                "rms_norm_eps": self.rms_norm_eps, "initializer_range": self.initializer_range}


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    text: TextConfig = TextConfig()
    vision: VisionConfig | None = VisionConfig()
    audio: AudioConfig | None = AudioConfig()
    image_token_id: int = 258_880
    audio_token_id: int = 258_881
    video_token_id: int = 258_884
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883  # serialized as `eoa_token_index` (spec §1.4)
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id",
                     "eoi_token_id", "boa_token_id", "eoa_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text.vocab_size:
                hf = "eoa_token_index" if name == "eoa_token_id" else name
                _fail(hf, f"{value} is outside the vocabulary [0, {self.text.vocab_size})")
        placeholders = (self.image_token_id, self.audio_token_id, self.video_token_id)
        if len(set(placeholders)) != 3:
            _fail("image_token_id", f"image/audio/video placeholder ids must differ, found {placeholders}")

    @property
    def placeholder_ids(self) -> tuple[int, int, int]:
        return (self.image_token_id, self.video_token_id, self.audio_token_id)

    @classmethod
    def gemma4_12b(cls) -> Gemma4Config:
        """The real google/gemma-4-12B values (spec §1, from its config.json)."""
        return cls(text=TextConfig(), vision=VisionConfig(), audio=AudioConfig())

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma4Config:
        model_type = d.get("model_type")
        if model_type != "gemma4_unified":
            _fail("model_type", f"expected 'gemma4_unified', found {model_type!r}")
        if "text_config" not in d or d["text_config"] is None:
            _fail("text_config", "missing")
        text = TextConfig.from_hf_dict(d["text_config"])
        vision = VisionConfig.from_hf_dict(d["vision_config"]) if d.get("vision_config") else None
        audio = AudioConfig.from_hf_dict(d["audio_config"]) if d.get("audio_config") else None
        if d.get("tie_word_embeddings") is False:
            _fail("tie_word_embeddings", "Gemma 4 ties the lm head to the embedding; found false")
        eoa = d.get("eoa_token_index", d.get("eoa_token_id", 258_883))
        if "eoa_token_index" in d and "eoa_token_id" in d and d["eoa_token_index"] != d["eoa_token_id"]:
            _fail("eoa_token_index", f"{d['eoa_token_index']} contradicts eoa_token_id {d['eoa_token_id']}")
        eos = d.get("eos_token_id")
        if isinstance(eos, int):
            eos = (eos,)
        return cls(
            text=text, vision=vision, audio=audio,
            image_token_id=int(d.get("image_token_id", 258_880)),
            audio_token_id=int(d.get("audio_token_id", 258_881)),
            video_token_id=int(d.get("video_token_id", 258_884)),
            boi_token_id=int(d.get("boi_token_id", 255_999)),
            eoi_token_id=int(d.get("eoi_token_id", 258_882)),
            boa_token_id=int(d.get("boa_token_id", 256_000)),
            eoa_token_id=int(eoa),
            eos_token_id=None if eos is None else tuple(int(e) for e in eos),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma4Config:
        """Read `config.json` from a folder (or the file itself). Hub ids go through `g4.load`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["Gemma4UnifiedForConditionalGeneration"],
            "model_type": "gemma4_unified",
            "text_config": self.text.to_hf_dict(),
            "vision_config": None if self.vision is None else self.vision.to_hf_dict(),
            "audio_config": None if self.audio is None else self.audio.to_hf_dict(),
            "image_token_id": self.image_token_id,
            "audio_token_id": self.audio_token_id,
            "video_token_id": self.video_token_id,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "boa_token_id": self.boa_token_id,
            "eoa_token_index": self.eoa_token_id,
            "tie_word_embeddings": True,
        }
        if self.eos_token_id is not None:
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | None = None) -> None:
        d = self.to_hf_dict()
        if dtype is not None:
            d["dtype"] = dtype
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")

    def replace(self, **changes: Any) -> Gemma4Config:
        return dataclasses.replace(self, **changes)


def small_config(
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 6,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    global_head_dim: int = 32,
    sliding_window: int = 8,
    mm_embed_dim: int = 32,
    mm_posemb_size: int = 40,
    final_logit_softcapping: float | None = 30.0,
    vision: bool = True,
    audio: bool = True,
) -> Gemma4Config:
    """A small config with the real structure (5:1 layers, k_eq_v, proportional RoPE, small window).

    Special ids sit at the top of the small vocabulary in the real order (the project's id rule):
    boi V-7, boa V-6, image V-5, audio V-4, eoi V-3, eoa V-2, video V-1.
    """
    layer_types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_hidden_layers))
    layer_types = layer_types[:-1] + (FULL,)
    v = vocab_size
    text = TextConfig(
        vocab_size=v, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, global_head_dim=global_head_dim,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=sliding_window,
        layer_types=layer_types, final_logit_softcapping=final_logit_softcapping,
    )
    return Gemma4Config(
        text=text,
        vision=VisionConfig(mm_embed_dim=mm_embed_dim, output_proj_dims=mm_embed_dim,
                            mm_posemb_size=mm_posemb_size) if vision else None,
        audio=AudioConfig() if audio else None,
        boi_token_id=v - 7, boa_token_id=v - 6, image_token_id=v - 5, audio_token_id=v - 4,
        eoi_token_id=v - 3, eoa_token_id=v - 2, video_token_id=v - 1,
    )
