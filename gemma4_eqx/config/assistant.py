"""`Gemma4UnifiedAssistantConfig` (`model_type` `gemma4_unified_assistant`): the Gemma 4 assistant's config.json,
read as strictly as the model's (`config.text`, `config.gemma4`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .fields import fail, parse_config_file, read_bool, read_int, read_section, short
from .text import TextConfig

TOP_LEVEL_KEYS = {"architectures", "model_type", "text_config", "backbone_hidden_size", "use_ordered_embeddings",
                  "num_centroids", "centroid_intermediate_top_k", "tie_word_embeddings", "transformers_version",
                  "dtype", "torch_dtype", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id"}


@dataclasses.dataclass(frozen=True)
class AssistantConfig:
    """`Gemma4UnifiedAssistantConfig`. Every layer reuses the target's KV (`num_kv_shared_layers` ==
    `num_hidden_layers`): a layer of kind K reads the target's last layer of kind K (`shared_kv_layer`)."""

    text: TextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    use_double_wide_mlp: bool = False

    def __post_init__(self) -> None:
        if self.use_ordered_embeddings:
            if self.text.vocab_size % self.num_centroids:
                fail("num_centroids", f"{self.num_centroids} does not divide vocab_size {self.text.vocab_size}")
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                fail("centroid_intermediate_top_k", f"expected 1..num_centroids ({self.num_centroids}), found "
                      f"{self.centroid_intermediate_top_k}")

    @property
    def mlp_width(self) -> int:
        return self.text.intermediate_size * (2 if self.use_double_wide_mlp else 1)

    @property
    def tokens_per_centroid(self) -> int:
        return self.text.vocab_size // self.num_centroids

    @staticmethod
    def shared_kv_layer(target_types: tuple[str, ...], kind: str) -> int:
        """The target layer whose KV a drafter layer of `kind` reads: the target's last layer of that kind."""
        idx = [i for i, t in enumerate(target_types) if t == kind]
        if not idx:
            raise ValueError(f"the target has no {kind} layer for the drafter's {kind} layers to read")
        return idx[-1]

    @classmethod
    def from_hf_dict(cls, d: Any) -> AssistantConfig:
        """config.json read strictly: unknown top-level keys, a text_config that is not all KV-shared, and every
        field `TextConfig.from_hf_dict` refuses raise `ConfigError` naming the field."""
        if not isinstance(d, dict):
            fail("config", f"expected a JSON object, found {short(d)}")
        if d.get("model_type") != "gemma4_unified_assistant":
            fail("model_type", f"expected 'gemma4_unified_assistant', found {short(d.get('model_type'))}")
        unknown = sorted(set(d) - TOP_LEVEL_KEYS)
        if unknown:
            fail(unknown[0], f"unknown field for a gemma4_unified_assistant config (known: {sorted(TOP_LEVEL_KEYS)})")
        text = dict(read_section(d, "text_config"))
        n = read_int(text, "num_hidden_layers", "text_config")
        shared = read_int(text, "num_kv_shared_layers", "text_config", n, minimum=0)
        if shared != n:
            fail("text_config.num_kv_shared_layers", f"expected {n} (= num_hidden_layers: every assistant layer "
                  f"reads the target's KV), found {shared}")
        double = read_bool(text, "use_double_wide_mlp", "text_config", False)
        text.pop("num_kv_shared_layers", None)
        text.pop("use_double_wide_mlp", None)
        if not read_bool(d, "tie_word_embeddings", "", True):
            fail("tie_word_embeddings", "the assistant ties its lm head to its embedding; found false")
        return cls(text=TextConfig.from_hf_dict(text),
                   backbone_hidden_size=read_int(d, "backbone_hidden_size", ""),
                   use_ordered_embeddings=read_bool(d, "use_ordered_embeddings", ""),
                   num_centroids=read_int(d, "num_centroids", "", 2048),
                   centroid_intermediate_top_k=read_int(d, "centroid_intermediate_top_k", "", 32),
                   use_double_wide_mlp=double)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AssistantConfig:
        return parse_config_file(path, cls.from_hf_dict)

    def to_hf_dict(self) -> dict[str, Any]:
        text = self.text.to_hf_dict()
        text["num_kv_shared_layers"] = self.text.num_hidden_layers
        text["use_double_wide_mlp"] = self.use_double_wide_mlp
        return {"architectures": ["Gemma4UnifiedAssistantForCausalLM"], "model_type": "gemma4_unified_assistant",
                "text_config": text, "backbone_hidden_size": self.backbone_hidden_size,
                "use_ordered_embeddings": self.use_ordered_embeddings, "num_centroids": self.num_centroids,
                "centroid_intermediate_top_k": self.centroid_intermediate_top_k, "tie_word_embeddings": True}
