"""Checkpoint I/O entry points: a model folder read (float or quantized, dispatched on its `quantization_config`)
and written atomically, and the names callers reach in one place (docs/spec/decoder-and-checkpoint.md §2).

The pieces, each in its own module of this package:
- `names`: the name table (`tensor_specs`, `TensorSpec`, prefixes, `CheckpointError`, `dtype_name`);
- `load`: reading a folder (`SafetensorsReader`, `validate`, `open_checkpoint`, `fill_model`, `load_float_folder`);
- `save`: writing one atomically (`replace_folder`, `write_float_safetensors`, sizes, fsyncs);
- `quantized`: the quantized layout's reader and writer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from ..quant.modules import is_quantized, quant_config_of
from ..utils.dtypes import dtype_name
from . import quantized
from .folders import refuse_non_checkpoint
from .load import (
    PARTIAL_SUFFIX,
    PROGRESS_MIN_BYTES,
    SAVE_MARK,
    OpenedFolder,
    fill_model,
    gemma4_config,
    leftovers,
    load_float_folder,
    open_checkpoint,
    open_folder,
    warn_leftovers,
)
from .names import (
    AUDIO_PROJECTION,
    SAFE_INDEX,
    SAFE_SINGLE,
    SHARD_FILE,
    TEXT_PREFIX,
    VISION_ALIAS_PREFIX,
    VISION_PREFIX,
    VISION_PROJECTION,
    VISION_PROJECTION_ALIAS,
    CheckpointError,
    TensorSpec,
    canonical_name,
    tensor_specs,
)
from .reader import (
    FolderChangedError,
    NonFiniteError,
    SafetensorsReader,
    check_shard_name,
    checkpoint_dtype,
    float_dtype,
    read_index,
    validate,
)
from .save import (
    CONFIG,
    GENERATION_CONFIG,
    PROCESSOR_FILES,
    check_target,
    default_generation_config,
    foreign_dropped,
    fsync_path,
    host_tensors,
    is_ours,
    mark_done,
    parse_size,
    plan_shards,
    replace_folder,
    write_float_safetensors,
    write_json,
)

__all__ = ["AUDIO_PROJECTION", "CONFIG", "GENERATION_CONFIG", "PARTIAL_SUFFIX", "PROCESSOR_FILES",
           "PROGRESS_MIN_BYTES", "SAFE_INDEX", "SAFE_SINGLE", "SAVE_MARK", "SHARD_FILE", "TEXT_PREFIX",
           "VISION_ALIAS_PREFIX", "VISION_PREFIX", "VISION_PROJECTION", "VISION_PROJECTION_ALIAS", "CheckpointError",
           "FolderChangedError", "NonFiniteError", "OpenedFolder", "SafetensorsReader", "TensorSpec",
           "canonical_name", "check_shard_name", "check_target", "checkpoint_dtype", "default_generation_config",
           "dtype_name", "fill_model", "float_dtype", "foreign_dropped", "host_tensors", "is_ours", "leftovers",
           "load_from_folder", "open_checkpoint", "open_folder", "parse_size", "plan_shards", "read_index",
           "replace_folder", "save", "tensor_specs", "validate", "warn_leftovers", "write_safetensors"]


def load_from_folder(folder: str, *, dtype: Any = None, place: Any = None, progress: Any = None,
                     model_kwargs: dict[str, Any] | None = None, mesh: Any = None, rules: Any = None,
                     layer_by_layer: bool | None = None, quantize: Any = None, check_finite: bool = True) -> Any:
    """A checkpoint folder as a `Gemma4`: on the default device, through `place`, or sharded over `mesh`.
    A quantized folder (`quantization_config` in config.json), or `quantize=`, loads quantized
    (`quantized.load_quantized_folder`). config.json and every weight file are opened once, together, before any
    tensor is read (`load.open_folder`): a save running meanwhile is seen whole or not at all."""
    refuse_non_checkpoint(folder)  # an adapter folder or g4.surgery.save's: say what it is and how to load it
    warn_leftovers(folder)

    def parse(raw: Any, path: str) -> Any:
        quantized.quant_config_from(raw, path)  # a foreign or inconsistent quantization_config first
        return gemma4_config(raw, path)

    opened = open_folder(folder, parse)
    try:
        if quantize is not None or quantized.quant_config_from(opened.raw_config, opened.config_path) is not None:
            if mesh is not None or place is not None:
                raise ValueError("mesh: a quantized model loads onto the default device; place it afterwards with "
                                 "g4.sharding.shard_model(model, mesh, g4.quant.sharding_rules(rules))")
            return quantized.load_quantized_folder(folder, dtype=dtype, quantize=quantize, model_kwargs=model_kwargs,
                                                   progress=progress, check_finite=check_finite, opened=opened)
        return load_float_folder(folder, dtype=dtype, place=place, progress=progress, model_kwargs=model_kwargs,
                                 mesh=mesh, rules=rules, layer_by_layer=layer_by_layer, check_finite=check_finite,
                                 opened=opened)
    finally:
        opened.close()


def write_safetensors(model: Any, folder: str, max_shard_size: int | str = "5GB") -> list[str]:
    """A model's safetensors into `folder` (float: `save.write_float_safetensors`; quantized:
    `quantized.write_safetensors`)."""
    os.makedirs(folder, exist_ok=True)
    if is_quantized(model):
        return quantized.write_safetensors(model, folder, max_shard_size)
    return write_float_safetensors(model, folder, max_shard_size)


def save(model: Any, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB", processor: Any = None,
         generation_config: dict[str, Any] | None = None, extra_files: Sequence[str | os.PathLike] = (),
         overwrite: bool = False) -> None:
    """Write a complete transformers-format folder atomically (see the module docstring): HF-named safetensors,
    `config.json`, `generation_config.json` (the one given; else the folder's existing one is kept; else
    `default_generation_config`), the processor's files when `processor` is given (`processor.save_pretrained`)
    and copies of `extra_files` (e.g. a source folder's tokenizer files).

    Works on a model sharded over a mesh too: each tensor is gathered to the host on its own as it is written.
    Refused before anything is written (`save.check_target`): "", `/`, system folders, the home or working
    directory (or a folder holding one), and a folder holding files this save would delete without having
    written them (another model's `*.safetensors`, an adapter's weights), unless `overwrite=True`.
    """
    folder = check_target(folder, overwrite)  # the real path ("~" expanded, symlinks resolved)
    # fail on an unsavable model or a bad size before anything is written
    (quantized.plan_shards if is_quantized(model) else plan_shards)(model, max_shard_size)
    if processor is not None and not hasattr(processor, "save_pretrained"):
        raise TypeError(f"processor: expected an object with save_pretrained(folder) (a g4.Processor), found "
                        f"{type(processor).__name__}")
    if generation_config is not None and not isinstance(generation_config, dict):
        raise TypeError(f"generation_config: expected a dict, found {type(generation_config).__name__}")
    extra = [os.fspath(p) for p in extra_files]
    for path in extra:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not a file (listed to be copied into {folder})")
    old_generation = os.path.join(folder, GENERATION_CONFIG)

    def write(staging: str) -> None:
        if processor is not None:
            before = set(os.listdir(staging))
            processor.save_pretrained(staging)
            for name in sorted(set(os.listdir(staging)) - before):
                if os.path.isfile(os.path.join(staging, name)):
                    fsync_path(os.path.join(staging, name))
            mark_done("write processor files")
        for path in extra:
            dst = os.path.join(staging, os.path.basename(path))
            shutil.copyfile(path, dst)
            fsync_path(dst)
            mark_done(f"copy {os.path.basename(path)}")
        write_safetensors(model, staging, max_shard_size)
        config = model.config.to_hf_dict()
        config["dtype"] = dtype_name(model.dtype)
        qc = quant_config_of(model)
        if qc is not None:
            config["quantization_config"] = qc.to_json()
        write_json(os.path.join(staging, CONFIG), config)
        if generation_config is not None:
            write_json(os.path.join(staging, GENERATION_CONFIG), generation_config)
        elif not os.path.isfile(os.path.join(staging, GENERATION_CONFIG)) and not os.path.isfile(old_generation):
            write_json(os.path.join(staging, GENERATION_CONFIG), default_generation_config(model.config))

    replace_folder(folder, write, overwrite=overwrite)
