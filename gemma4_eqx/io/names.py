"""Checkpoint names: which transformers-format tensor fills which leaf of a `Gemma4` (docs/spec/decoder-and-checkpoint.md §2).

One table drives load (`checkpoint_load`), save (`checkpoint_save`), the sharded load and the bridge. The on-disk
names are transformers' (`model.language_model.layers.5.self_attn.q_proj.weight`, ...). Linear
weights are stored PyTorch-style `[out, in]` and transposed to `[in, out]`. Per-layer tensors are gathered into
the decoder stack's `[repeats, run_length, ...]` arrays. The model is built abstractly with
`eqx.filter_eval_shape` (no weight is materialised twice) and filled with one `eqx.tree_at`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from ..layers.attention import Attention
from ..layers.linear import Linear
from ..layers.mlp import MLP, FusedMLP
from ..model.assistant import Assistant

TEXT_PREFIX = "model.language_model."
# On-disk names of the multimodal tensors and the names transformers uses after its load-time rename;
# the loader accepts both, the saver writes the on-disk ones (docs/spec/decoder-and-checkpoint.md §2.3).
VISION_PREFIX = "model.vision_embedder."
VISION_ALIAS_PREFIX = "model.embed_vision."
VISION_PROJECTION = "model.embed_vision.embedding_projection.weight"
VISION_PROJECTION_ALIAS = "model.embed_vision.multimodal_embedder.embedding_projection.weight"
AUDIO_PROJECTION = "model.embed_audio.embedding_projection.weight"

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")  # the shard names `save` writes

# A PEFT adapter folder (`io.adapters`): LoRA tensors named PEFT_PREFIX + the module's path in transformers' model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One on-disk tensor: where it lives in the Equinox tree and how it is laid out on disk."""

    name: str
    leaf: Callable[[Any], Any]  # model -> the (possibly stacked) array this tensor is part of
    index: tuple[int, ...]  # position inside a stacked leaf, () for unstacked leaves
    transpose: bool  # stored [out, in] on disk, [in, out] in the model
    shape: tuple[int, ...]  # on-disk shape


_LAYER_TENSORS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("input_layernorm.weight", lambda l: l.input_layernorm.weight, False),
    ("post_attention_layernorm.weight", lambda l: l.post_attention_layernorm.weight, False),
    ("pre_feedforward_layernorm.weight", lambda l: l.pre_feedforward_layernorm.weight, False),
    ("post_feedforward_layernorm.weight", lambda l: l.post_feedforward_layernorm.weight, False),
    ("layer_scalar", lambda l: l.layer_scalar, False),
    ("self_attn.q_proj.weight", lambda l: l.self_attn.q_proj.weight, True),
    ("self_attn.k_proj.weight", lambda l: l.self_attn.k_proj.weight, True),
    ("self_attn.v_proj.weight", lambda l: l.self_attn.v_proj.weight, True),
    ("self_attn.o_proj.weight", lambda l: l.self_attn.o_proj.weight, True),
    ("self_attn.q_norm.weight", lambda l: l.self_attn.q_norm.weight, False),
    ("self_attn.k_norm.weight", lambda l: l.self_attn.k_norm.weight, False),
    ("mlp.gate_proj.weight", lambda l: l.mlp.gate_proj.weight, True),
    ("mlp.up_proj.weight", lambda l: l.mlp.up_proj.weight, True),
    ("mlp.down_proj.weight", lambda l: l.mlp.down_proj.weight, True),
)

_VISION_TENSORS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("patch_ln1.weight", lambda v: v.patch_ln1.weight, False),
    ("patch_ln1.bias", lambda v: v.patch_ln1.bias, False),
    ("patch_dense.weight", lambda v: v.patch_dense.weight, True),
    ("patch_dense.bias", lambda v: v.patch_dense.bias, False),
    ("patch_ln2.weight", lambda v: v.patch_ln2.weight, False),
    ("patch_ln2.bias", lambda v: v.patch_ln2.bias, False),
    ("pos_embedding", lambda v: v.pos_embedding, False),
    ("pos_norm.weight", lambda v: v.pos_norm.weight, False),
    ("pos_norm.bias", lambda v: v.pos_norm.bias, False),
)


def _disk_shape(leaf_shape: tuple[int, ...], n_stack: int, transpose: bool) -> tuple[int, ...]:
    shape = tuple(leaf_shape[n_stack:])
    return shape[::-1] if transpose else shape


# The modules of a decoder layer that carry transformers' names, and what each must be.
_STOCK_MODULES: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("self_attn", Attention, "a standard Gemma 4 attention layer (gemma4_eqx.layers.attention.Attention)"),
    ("mlp", (MLP, FusedMLP), "the standard Gemma 4 MLP (gemma4_eqx.layers.mlp.MLP, or FusedMLP's views of it)"),
    *((f"self_attn.{p}", Linear, "a plain Linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *((f"mlp.{p}", Linear, "a plain Linear") for p in ("gate_proj", "up_proj", "down_proj")),
)


def _check_stock_run(stack: Any, run: int) -> None:
    """Only the stock modules have checkpoint names: name the first module of a run that is not one (e.g. after
    `g4.surgery.replace_attention` or `add_lora`) instead of failing on a missing attribute."""
    layers = [i for i in range(stack.num_layers) if stack.locate(i)[0] == run]
    for path, cls, what in _STOCK_MODULES:
        module = stack.runs[run]
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is None and path == "self_attn.v_proj":
            continue  # full layers with attention_k_eq_v
        if not isinstance(module, cls):
            hint = ("fold adapters in with g4.surgery.merge_lora(model) first, save only the adapters with "
                    "g4.save_adapters, or save the edited model with g4.surgery.save" if cls is Linear else
                    "save the edited model with g4.surgery.save (read it back with g4.surgery.load)")
            raise CheckpointError(
                f"{TEXT_PREFIX}layers.{layers[0]}.{path} (model.layers.runs[{run}].{path}, layers {layers}): "
                f"expected {what}, found {type(module).__name__}; only the stock modules have transformers' "
                f"checkpoint names, and g4.save does not drop parameters that have none. To save this model, "
                f"{hint}")


def tensor_specs(model: Any) -> list[TensorSpec]:
    """Every on-disk tensor of `model` (concrete or abstract), in transformers' order."""
    if isinstance(model, Assistant):
        return assistant_tensor_specs(model)
    specs: list[TensorSpec] = []

    def add(name: str, leaf: Callable[[Any], Any], index: tuple[int, ...], transpose: bool) -> None:
        try:
            shape = leaf(model).shape
        except AttributeError as e:  # a module swapped for one without this parameter
            raise CheckpointError(f"{name}: the model has no such parameter ({e}); only a stock Gemma 4 model "
                                  "has transformers' checkpoint names (see g4.surgery.save)") from e
        specs.append(TensorSpec(name, leaf, index, transpose, _disk_shape(shape, len(index), transpose)))

    add(TEXT_PREFIX + "embed_tokens.weight", lambda m: m.embed_tokens, (), False)
    stack = model.layers
    for run in range(len(stack.runs)):
        _check_stock_run(stack, run)
    for i in range(stack.num_layers):
        run, repeat, slot = stack.locate(i)
        for suffix, get, transpose in _LAYER_TENSORS:
            if suffix.startswith("self_attn.v_proj") and stack.runs[run].self_attn.v_proj is None:
                continue  # full layers with attention_k_eq_v: values are the raw keys
            add(f"{TEXT_PREFIX}layers.{i}.{suffix}",
                lambda m, run=run, get=get: get(m.layers.runs[run]), (repeat, slot), transpose)
    add(TEXT_PREFIX + "norm.weight", lambda m: m.norm.weight, (), False)
    if model.embed_vision is not None:
        for suffix, get, transpose in _VISION_TENSORS:
            add(VISION_PREFIX + suffix, lambda m, get=get: get(m.embed_vision), (), transpose)
        add(VISION_PROJECTION, lambda m: m.embed_vision.projection.embedding_projection.weight, (), True)
    if model.embed_audio is not None:
        add(AUDIO_PROJECTION, lambda m: m.embed_audio.projection.embedding_projection.weight, (), True)
    return specs


# The assistant (`model.assistant.Assistant`, transformers' `Gemma4UnifiedAssistantForCausalLM`): its layers
# are KV-shared, so they hold no k/v projections or k_norm. The integer `masked_embedding.token_ordering` buffer is
# read and written by `assistant.load_assistant` / `save_assistant` beside these float tensors.
ASSISTANT_PREFIX = "model."
_ASSISTANT_LAYER_TENSORS: tuple[tuple[str, Callable[[Any], Any], bool], ...] = (
    ("input_layernorm.weight", lambda l: l.input_layernorm.weight, False),
    ("post_attention_layernorm.weight", lambda l: l.post_attention_layernorm.weight, False),
    ("pre_feedforward_layernorm.weight", lambda l: l.pre_feedforward_layernorm.weight, False),
    ("post_feedforward_layernorm.weight", lambda l: l.post_feedforward_layernorm.weight, False),
    ("layer_scalar", lambda l: l.layer_scalar, False),
    ("self_attn.q_proj.weight", lambda l: l.q_proj.weight, True),
    ("self_attn.o_proj.weight", lambda l: l.o_proj.weight, True),
    ("self_attn.q_norm.weight", lambda l: l.q_norm.weight, False),
    ("mlp.gate_proj.weight", lambda l: l.mlp.gate_proj.weight, True),
    ("mlp.up_proj.weight", lambda l: l.mlp.up_proj.weight, True),
    ("mlp.down_proj.weight", lambda l: l.mlp.down_proj.weight, True),
)


def assistant_tensor_specs(model: Any) -> list[TensorSpec]:
    """Every float tensor of an `Assistant` (concrete or abstract), with transformers' names."""
    specs: list[TensorSpec] = []

    def add(name: str, leaf: Callable[[Any], Any], transpose: bool) -> None:
        specs.append(TensorSpec(name, leaf, (), transpose, _disk_shape(leaf(model).shape, 0, transpose)))

    add(ASSISTANT_PREFIX + "embed_tokens.weight", lambda m: m.embed_tokens, False)
    for i in range(len(model.layers)):
        for suffix, get, transpose in _ASSISTANT_LAYER_TENSORS:
            add(f"{ASSISTANT_PREFIX}layers.{i}.{suffix}", lambda m, i=i, get=get: get(m.layers[i]), transpose)
    add(ASSISTANT_PREFIX + "norm.weight", lambda m: m.norm.weight, False)
    add("pre_projection.weight", lambda m: m.pre_projection.weight, True)
    add("post_projection.weight", lambda m: m.post_projection.weight, True)
    if model.centroids is not None:
        add("masked_embedding.centroids.weight", lambda m: m.centroids.weight, True)
    return specs


def canonical_name(name: str) -> str:
    """Map transformers' in-memory names (after its load-time rename) to the on-disk ones."""
    if name == VISION_PROJECTION_ALIAS:
        return VISION_PROJECTION
    if name.startswith(VISION_ALIAS_PREFIX) and name != VISION_PROJECTION:
        return VISION_PREFIX + name[len(VISION_ALIAS_PREFIX):]
    return name
