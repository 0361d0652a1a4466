"""Configuration: frozen dataclasses read from and written back to a transformers `config.json`.

The field names are transformers' (`Gemma4UnifiedConfig` here; its parts in `text.py` and `media.py`), so a
reader can hold these files against the checkpoint's JSON line by line.
Spec (docs/spec/decoder-and-checkpoint.md): §1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .fields import (
    fail,
    is_int,
    parse_config_file,
    read_bool,
    read_int,
    read_section,
    short,
    token_ids,
)
from .media import AudioConfig, VisionConfig
from .text import FULL, SLIDING, TextConfig


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
    eoa_token_id: int = 258_883  # serialized as `eoa_token_index` (docs/spec/decoder-and-checkpoint.md §1.4)
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id",
                     "eoi_token_id", "boa_token_id", "eoa_token_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.text.vocab_size:
                hf = "eoa_token_index" if name == "eoa_token_id" else name
                fail(hf, f"{value} is outside the vocabulary [0, {self.text.vocab_size})")
        if self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", token_ids(self.eos_token_id, "eos_token_id",
                                                                 self.text.vocab_size))
        placeholders = (self.image_token_id, self.audio_token_id, self.video_token_id)
        if len(set(placeholders)) != 3:
            fail("image_token_id", f"image/audio/video placeholder ids must differ, found {placeholders}")

    @property
    def placeholder_ids(self) -> tuple[int, int, int]:
        return (self.image_token_id, self.video_token_id, self.audio_token_id)

    @classmethod
    def gemma4_12b(cls) -> Gemma4Config:
        """The real google/gemma-4-12B values (docs/spec/decoder-and-checkpoint.md §1, from its config.json)."""
        return cls(text=TextConfig(), vision=VisionConfig(), audio=AudioConfig())

    @classmethod
    def from_hf_dict(cls, d: Any) -> Gemma4Config:
        """A transformers `config.json` (as a dict) read strictly; any problem raises `ConfigError` naming the
        field, the value found and what was expected."""
        if not isinstance(d, dict):
            fail("config", f"expected a JSON object, found {short(d)}")
        model_type = d.get("model_type")
        if model_type != "gemma4_unified":
            fail("model_type", f"expected 'gemma4_unified', found {short(model_type)}")
        if d.get("text_config") is None:
            fail("text_config", "missing")
        text = TextConfig.from_hf_dict(read_section(d, "text_config"))
        vision = read_section(d, "vision_config", default=None)
        audio = read_section(d, "audio_config", default=None)
        vision = VisionConfig.from_hf_dict(vision) if vision else None
        audio = AudioConfig.from_hf_dict(audio) if audio else None
        if not read_bool(d, "tie_word_embeddings", "", True):
            fail("tie_word_embeddings", "Gemma 4 ties the lm head to the embedding; found false")
        ids = {name: read_int(d, name, "", minimum=0) for name in
               ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id", "eoi_token_id", "boa_token_id")}
        if "eoa_token_index" in d or "eoa_token_id" not in d:
            eoa = read_int(d, "eoa_token_index", "", minimum=0)
            if "eoa_token_id" in d and d["eoa_token_id"] != eoa:
                fail("eoa_token_index", f"{eoa} contradicts eoa_token_id {short(d['eoa_token_id'])}")
        else:
            eoa = read_int(d, "eoa_token_id", "", minimum=0)
        eos = d.get("eos_token_id")
        return cls(text=text, vision=vision, audio=audio, eoa_token_id=eoa, **ids,
                   eos_token_id=None if eos is None else token_ids(eos, "eos_token_id", text.vocab_size))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma4Config:
        """Read `config.json` from a folder (or the file itself). Hub ids go through `g4.load`.

        A file that cannot be read or parsed (not a regular file, larger than 8 MiB, a symlink out of the folder:
        `utils.files.Folder`), or that describes no valid model, raises `ConfigError` naming the file (and the
        field); a missing file raises `FileNotFoundError`."""
        return parse_config_file(path, cls.from_hf_dict)

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
        path = os.path.join(folder, "config.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:  # written beside, fsynced, renamed over: the old config.json or the new one, never half of one
            with open(tmp, "w") as f:
                json.dump(d, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

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
