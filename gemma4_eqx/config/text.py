"""The text decoder's configuration: `TextConfig` (transformers' `Gemma4UnifiedTextConfig`), the per-layer geometry
as transformers resolves it (`LayerGeometry`, `per_layer_config`), and the RoPE schedules (`RopeConfig`).
Spec (docs/spec/decoder-and-checkpoint.md): §1.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

from .fields import (
    MAX_LAYERS,
    REQUIRED,
    as_number,
    fail,
    field_default,
    is_int,
    read_bool,
    read_choice,
    read_float,
    read_int,
    read_section,
    short,
    token_ids,
)

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One RoPE schedule (docs/spec/decoder-and-checkpoint.md §4). `proportional` rotates only `partial_rotary_factor` of the dims."""

    rope_type: Literal["default", "proportional"] = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "proportional"):
            fail("rope_type", f"expected 'default' or 'proportional', found {self.rope_type!r}")
        if as_number(self.rope_theta) is None or self.rope_theta <= 0:
            fail("rope_theta", f"expected a finite number > 0, found {self.rope_theta!r}")
        if as_number(self.partial_rotary_factor) is None or not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", f"expected a value in (0, 1], found {self.partial_rotary_factor!r}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], field: str) -> RopeConfig:
        rope_type = read_choice(d, "rope_type", field, ("default", "proportional"))
        factor = d.get("factor")
        if factor is not None and (as_number(factor) is None or factor != 1.0):
            fail(f"{field}.factor", f"RoPE scaling is not used by Gemma 4; expected 1.0 or null, found {short(factor)}")
        # proportional RoPE rotates only a fraction of the dims: that fraction is never assumed
        prf = read_float(d, "partial_rotary_factor", field, REQUIRED if rope_type == "proportional" else 1.0,
                     maximum=1.0)
        return cls(rope_type=rope_type, rope_theta=read_float(d, "rope_theta", field), partial_rotary_factor=prf)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "proportional":
            d["partial_rotary_factor"] = self.partial_rotary_factor
        return d


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What differs between a sliding and a full attention layer (docs/spec/decoder-and-checkpoint.md §1.1, derived table)."""

    layer_type: str
    num_key_value_heads: int
    head_dim: int
    has_v_proj: bool  # False on full layers when attention_k_eq_v: values are the raw keys
    sliding_window: int | None
    rope: RopeConfig


PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")  # what a gemma4_unified layer may override


def _per_type_geometry(d: dict[str, Any], p: str, layer_types: list[str], head_dim: int, num_kv: int,
                       k_eq_v: bool, file_global_head_dim: int | None,
                       file_global_kv: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(head_dim, KV heads) of the sliding and of the full layers, resolved as transformers resolves them.

    transformers (`Gemma4UnifiedTextConfig.__post_init__` and its per-layer view) reads the full layers'
    geometry from one of two spellings:
    - `per_layer_config` present (what transformers writes, `{}` or null included): each layer is the global
      config with its entry's fields overriding it; `global_head_dim` and `num_global_key_value_heads` are
      ignored (transformers drops an override equal to the global value, so `{"05": {"head_dim": 512}}` means
      layer 5 keeps `num_key_value_heads`, and `{}` means full layers are shaped like sliding ones);
    - no `per_layer_config` (Google's original file): full layers take `global_head_dim`, and
      `num_global_key_value_heads` when `attention_k_eq_v` is true (ignored otherwise).
    transformers builds its RoPE tables per layer *type*, so layers of one type must agree (it raises
    otherwise); so do we. Where both spellings are present they must agree (a file that says two things is
    refused rather than read one way). Per-layer fields other than head_dim and num_key_value_heads have no
    meaning in gemma4_unified: refused unless equal to the global value (which transformers drops).
    """
    if "per_layer_config" not in d:
        if FULL in layer_types and file_global_head_dim is None:
            fail(f"{p}.global_head_dim", "missing; expected a positive integer here or as per_layer_config's "
                  "head_dim (the real config.json always carries one of them)")
        if k_eq_v and FULL in layer_types and "num_global_key_value_heads" not in d:
            fail(f"{p}.num_global_key_value_heads", "missing; expected a positive integer here or as "
                  "per_layer_config's num_key_value_heads (attention_k_eq_v is true)")
        full_kv = file_global_kv if k_eq_v and file_global_kv is not None else num_kv
        full_hd = head_dim if file_global_head_dim is None else file_global_head_dim
        return (head_dim, num_kv), (full_hd, full_kv)
    per_layer = read_section(d, "per_layer_config", p, None) or {}
    resolved: dict[int, tuple[int, int]] = {}
    keys: dict[int, str] = {}
    for key, value in per_layer.items():
        where = f"{p}.per_layer_config[{key!r}]"
        if not key.isascii() or not key.isdigit():
            fail(where, "expected a layer index as key")
        idx = int(key)
        if not 0 <= idx < len(layer_types):
            fail(where, f"layer index outside [0, {len(layer_types)})")
        if idx in keys:
            fail(where, f"layer {idx} is given twice (also as {keys[idx]!r})")
        if not isinstance(value, dict):
            fail(where, f"expected an object, found {short(value)}")
        for name, override in value.items():
            if name in PER_LAYER_FIELDS or (name == "skip" and override in ([], None)):
                continue
            if name in d and d[name] == override:  # transformers drops an override equal to the global value
                continue
            fail(f"{where}.{name}", f"only {' and '.join(PER_LAYER_FIELDS)} may differ per layer in gemma4_unified, "
                  f"found {name} = {short(override)}")
        keys[idx] = key
        resolved[idx] = (read_int(value, "head_dim", where, head_dim), read_int(value, "num_key_value_heads", where, num_kv))
    types = {}
    for layer_type in LAYER_TYPES:
        layers = [i for i, t in enumerate(layer_types) if t == layer_type]
        geometries = {i: resolved.get(i, (head_dim, num_kv)) for i in layers}
        if not geometries:
            types[layer_type] = (head_dim, num_kv)
            continue
        first = geometries[layers[0]]
        for i in layers:
            if geometries[i] != first:
                odd = i if i in keys else layers[0]
                other = layers[0] if odd != layers[0] else i
                where = f"{p}.per_layer_config[{keys[odd]!r}]"
                fail(where, f"gives {layer_type} layer {odd} head_dim {geometries[odd][0]} and num_key_value_heads "
                      f"{geometries[odd][1]}, but {layer_type} layer {other} has {geometries[other][0]} and "
                      f"{geometries[other][1]}; transformers needs one geometry per layer type")
        types[layer_type] = first
    full_hd, full_kv = types[FULL]
    if file_global_head_dim is not None and FULL in layer_types and file_global_head_dim != full_hd:
        fail(f"{p}.global_head_dim", f"{file_global_head_dim} contradicts per_layer_config: the full layers' "
              f"head_dim is {full_hd} there")
    if file_global_kv is not None and k_eq_v and FULL in layer_types and file_global_kv != full_kv:
        fail(f"{p}.num_global_key_value_heads", f"{file_global_kv} contradicts per_layer_config: the full layers' "
              f"num_key_value_heads is {full_kv} there")
    return types[SLIDING], types[FULL]


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
                fail(f"text_config.{name}", f"expected a positive integer, found {value!r}")
        if self.num_global_key_value_heads is not None and (not is_int(self.num_global_key_value_heads)
                                                            or self.num_global_key_value_heads <= 0):
            fail("text_config.num_global_key_value_heads",
                  f"expected a positive integer or null, found {self.num_global_key_value_heads!r}")
        if not isinstance(self.attention_k_eq_v, bool):
            fail("text_config.attention_k_eq_v", f"expected true or false, found {self.attention_k_eq_v!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("text_config.layer_types",
                  f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                fail(f"text_config.layer_types[{i}]", f"expected one of {LAYER_TYPES}, found {t!r}")
        for t in set(self.layer_types):
            g = self.layer_geometry_for_type(t)
            if self.num_attention_heads % g.num_key_value_heads:
                field = "num_key_value_heads" if t == SLIDING else "num_global_key_value_heads"
                fail(f"text_config.{field}", f"{g.num_key_value_heads} does not divide "
                      f"num_attention_heads={self.num_attention_heads}")
            if g.head_dim % 2:
                fail("text_config.head_dim" if t == SLIDING else "text_config.global_head_dim",
                      f"RoPE needs an even head dimension, found {g.head_dim}")
        if self.hidden_activation not in ("gelu_pytorch_tanh",):
            fail("text_config.hidden_activation",
                  f"expected 'gelu_pytorch_tanh', found {self.hidden_activation!r}")
        if self.use_bidirectional_attention not in (None, "vision"):
            fail("text_config.use_bidirectional_attention",
                  f"expected 'vision' or null, found {self.use_bidirectional_attention!r}"
                  " ('all' is a different model family and is not supported)")
        if not self.tie_word_embeddings:
            fail("text_config.tie_word_embeddings", "Gemma 4 ties the lm head to the embedding; found false")
        if self.final_logit_softcapping is not None and (as_number(self.final_logit_softcapping) is None
                                                         or self.final_logit_softcapping <= 0):
            fail("text_config.final_logit_softcapping",
                  f"expected a positive number or null, found {self.final_logit_softcapping}")
        if as_number(self.rms_norm_eps) is None or self.rms_norm_eps <= 0:
            fail("text_config.rms_norm_eps", f"expected a finite number > 0, found {self.rms_norm_eps!r}")
        if as_number(self.initializer_range) is None or self.initializer_range < 0:
            fail("text_config.initializer_range", f"expected a finite number >= 0, found {self.initializer_range!r}")
        if not is_int(self.max_position_embeddings) or self.max_position_embeddings <= 0:
            fail("text_config.max_position_embeddings",
                  f"expected a positive integer, found {self.max_position_embeddings!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.vocab_size:
                fail(f"text_config.{name}", f"{value!r} is outside the vocabulary [0, {self.vocab_size})")
        token_ids(self.eos_token_id, "text_config.eos_token_id", self.vocab_size)

    # ---- derived geometry -------------------------------------------------------------------
    def layer_geometry_for_type(self, layer_type: str) -> LayerGeometry:
        if layer_type == SLIDING:
            return LayerGeometry(SLIDING, self.num_key_value_heads, self.head_dim, True,
                                 self.sliding_window, self.rope_sliding)
        kv = self.num_key_value_heads if self.num_global_key_value_heads is None else self.num_global_key_value_heads
        return LayerGeometry(FULL, kv, self.global_head_dim, not self.attention_k_eq_v, None, self.rope_full)

    def layer_geometry(self, layer_idx: int) -> LayerGeometry:
        return self.layer_geometry_for_type(self.layer_types[layer_idx])

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ---- HF round trip ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Any) -> TextConfig:
        """`text_config` read strictly: every field typed and ranged, and no default assumed for a field the real
        config.json always carries (sizes, heads, window, RoPE, soft cap, eps, ...). Raises `ConfigError`."""
        p = "text_config"
        if not isinstance(d, dict):
            fail(p, f"expected an object, found {short(d)}")
        read_choice(d, "model_type", p, ("gemma4_unified_text", "gemma4_text"), "gemma4_unified_text")
        if read_bool(d, "enable_moe_block", p, False):
            fail(f"{p}.enable_moe_block", "mixture-of-experts Gemma 4 variants are not supported")
        if read_int(d, "num_kv_shared_layers", p, 0, minimum=0) != 0:
            fail(f"{p}.num_kv_shared_layers", f"expected 0 (the 12B shares no KV), found {d['num_kv_shared_layers']}")
        if read_int(d, "hidden_size_per_layer_input", p, 0, minimum=0, nullable=True):
            fail(f"{p}.hidden_size_per_layer_input", "per-layer inputs are not part of gemma4_unified")
        if read_bool(d, "attention_bias", p, False):
            fail(f"{p}.attention_bias", "expected false: Gemma 4 attention has no biases")
        if read_bool(d, "use_double_wide_mlp", p, False):
            fail(f"{p}.use_double_wide_mlp", "expected false (only KV-shared layers use it)")
        n_layers = read_int(d, "num_hidden_layers", p, maximum=MAX_LAYERS)
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' rule: every 6th layer full, the last forced full
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
            if layer_types:
                layer_types[-1] = FULL
        elif not isinstance(layer_types, list):
            fail(f"{p}.layer_types", f"expected a list of {LAYER_TYPES}, found {short(layer_types)}")
        for i, t in enumerate(layer_types):
            if not isinstance(t, str) or t not in LAYER_TYPES:
                fail(f"{p}.layer_types[{i}]", f"expected one of {LAYER_TYPES}, found {short(t)}")
        if layer_types and layer_types[-1] != FULL:  # transformers forces it too (with a warning), so do we
            warnings.warn(f"{p}.layer_types: the last layer is {layer_types[-1]!r}; transformers forces the last "
                          f"layer to {FULL!r} and so does gemma4-eqx", stacklevel=3)
            layer_types = [*layer_types[:-1], FULL]
        k_eq_v = read_bool(d, "attention_k_eq_v", p)
        head_dim = read_int(d, "head_dim", p)
        num_kv = read_int(d, "num_key_value_heads", p)
        file_global_head_dim = read_int(d, "global_head_dim", p, None)
        file_global_kv = read_int(d, "num_global_key_value_heads", p, None, nullable=True)
        sliding_geo, full_geo = _per_type_geometry(d, p, layer_types, head_dim, num_kv, k_eq_v,
                                                   file_global_head_dim, file_global_kv)
        head_dim, num_kv = sliding_geo
        global_head_dim, full_kv = full_geo
        # the field keeps the file's spelling where it means the same: null / absent when full layers have
        # num_key_value_heads (so a config written from one built with None reads back equal)
        num_global_kv = None if full_kv == num_kv and file_global_kv is None else full_kv
        rope = read_section(d, "rope_parameters", p)
        rope_sliding = RopeConfig.from_hf_dict(read_section(rope, SLIDING, f"{p}.rope_parameters"),
                                               f"{p}.rope_parameters.{SLIDING}")
        rope_full = RopeConfig.from_hf_dict(read_section(rope, FULL, f"{p}.rope_parameters"),
                                            f"{p}.rope_parameters.{FULL}")
        eos = d.get("eos_token_id")
        for key in ("pad_token_id", "bos_token_id"):
            if d.get(key) is not None:
                read_int(d, key, p, minimum=0)
        return cls(
            vocab_size=read_int(d, "vocab_size", p),
            hidden_size=read_int(d, "hidden_size", p),
            intermediate_size=read_int(d, "intermediate_size", p),
            num_hidden_layers=n_layers,
            num_attention_heads=read_int(d, "num_attention_heads", p),
            num_key_value_heads=num_kv,
            head_dim=head_dim,
            global_head_dim=global_head_dim,
            num_global_key_value_heads=num_global_kv,
            attention_k_eq_v=k_eq_v,
            sliding_window=read_int(d, "sliding_window", p),
            layer_types=tuple(layer_types),
            rope_sliding=rope_sliding,
            rope_full=rope_full,
            final_logit_softcapping=read_float(d, "final_logit_softcapping", p, nullable=True),
            rms_norm_eps=read_float(d, "rms_norm_eps", p, maximum=1.0),
            hidden_activation=read_choice(d, "hidden_activation", p, ("gelu_pytorch_tanh",),
                                      field_default(cls, "hidden_activation")),
            tie_word_embeddings=read_bool(d, "tie_word_embeddings", p, field_default(cls, "tie_word_embeddings")),
            use_bidirectional_attention=read_choice(d, "use_bidirectional_attention", p, ("vision", None)),
            max_position_embeddings=read_int(d, "max_position_embeddings", p, field_default(cls, "max_position_embeddings")),
            pad_token_id=field_default(cls, "pad_token_id") if d.get("pad_token_id") is None else d["pad_token_id"],
            bos_token_id=field_default(cls, "bos_token_id") if d.get("bos_token_id") is None else d["bos_token_id"],
            eos_token_id=field_default(cls, "eos_token_id") if eos is None else token_ids(eos, f"{p}.eos_token_id"),
            initializer_range=read_float(d, "initializer_range", p, field_default(cls, "initializer_range"), positive=False),
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
