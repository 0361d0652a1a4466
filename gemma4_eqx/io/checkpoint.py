"""Checkpoint I/O: transformers-format safetensors in and out (docs/spec/decoder-and-checkpoint.md §2).

Split by concern; this module keeps every name importable from one place:
- `checkpoint_names`: the name table (`tensor_specs`, `TensorSpec`, prefixes, `CheckpointError`, `dtype_name`);
- `checkpoint_load`: reading a folder (`SafetensorsReader`, `validate`, `fill_model`, `load_from_folder`);
- `checkpoint_save`: writing one atomically (`save`, `write_safetensors`, `replace_folder`).
"""

from __future__ import annotations

from .load import (PARTIAL_SUFFIX, PROGRESS_MIN_BYTES, SAVE_MARK, SafetensorsReader, check_shard_name,
                   checkpoint_dtype, fill_model, float_dtype, leftovers, load_from_folder, read_index, validate,
                   warn_leftovers)
from .names import (AUDIO_PROJECTION, SAFE_INDEX, SAFE_SINGLE, SHARD_FILE, TEXT_PREFIX, VISION_ALIAS_PREFIX,
                    VISION_PREFIX, VISION_PROJECTION, VISION_PROJECTION_ALIAS, CheckpointError, TensorSpec,
                    _canonical_name, dtype_name, tensor_specs)
from .save import (CONFIG, GENERATION_CONFIG, PROCESSOR_FILES, _parse_size, default_generation_config, host_tensors,
                   plan_shards, replace_folder, save, write_safetensors)

__all__ = ["AUDIO_PROJECTION", "CONFIG", "GENERATION_CONFIG", "PARTIAL_SUFFIX", "PROCESSOR_FILES",
           "PROGRESS_MIN_BYTES", "SAFE_INDEX", "SAFE_SINGLE", "SAVE_MARK", "SHARD_FILE", "TEXT_PREFIX",
           "VISION_ALIAS_PREFIX", "VISION_PREFIX", "VISION_PROJECTION", "VISION_PROJECTION_ALIAS", "CheckpointError",
           "SafetensorsReader", "TensorSpec", "check_shard_name", "checkpoint_dtype", "default_generation_config",
           "dtype_name", "fill_model", "float_dtype", "host_tensors", "leftovers", "load_from_folder",
           "plan_shards", "read_index", "replace_folder", "save", "tensor_specs", "validate", "warn_leftovers",
           "write_safetensors"]
