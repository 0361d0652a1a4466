"""The Gemma 4 assistant's checkpoint folder (transformers' `Gemma4UnifiedAssistantForCausalLM`): read into a
`model.assistant.Assistant` and written back bit for bit, through the same loader and atomic save as the model."""

from __future__ import annotations

import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..config.assistant import AssistantConfig
from ..config.fields import ConfigError
from ..model.assistant import Assistant
from ..utils.dtypes import dtype_name
from .load import fill_model, open_checkpoint, open_folder
from .names import CheckpointError, tensor_specs
from .safetensors import DTYPE_NAMES, write_file
from .save import CONFIG, check_target, host_tensors, replace_folder, write_json

ORDERING = "masked_embedding.token_ordering"
_INT_DTYPES = {"I64": np.int64, "I32": np.int32}


def _assistant_config(raw: Any, path: str) -> AssistantConfig:
    try:
        return AssistantConfig.from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_assistant(folder: str | os.PathLike, *, dtype: Any = None, check_finite: bool = True) -> Assistant:
    """A `Gemma4UnifiedAssistantForCausalLM` folder (config.json + safetensors) as an `Assistant`.

    Same rules as `g4.load`: every tensor present with its shape (errors name the tensor), no unexpected one,
    one float dtype unless `dtype=` casts, each checked finite (`check_finite`); the folder's files opened
    together first (`load.open_folder`); `masked_embedding.token_ordering` must be an integer vector of token
    ids in [0, vocab)."""
    folder = os.fspath(folder)
    opened = open_folder(folder, _assistant_config)
    try:
        config, reader = opened.config, opened.reader
        if config.use_ordered_embeddings:
            reader.exclude = frozenset({ORDERING})
        ordering, ordering_dtype = None, "I64"
        if config.use_ordered_embeddings:
            if ORDERING not in reader.location:
                raise CheckpointError(f"{ORDERING}: missing from the checkpoint (use_ordered_embeddings is true)")
            shape, ordering_dtype = reader.info(ORDERING)
            if ordering_dtype not in _INT_DTYPES:
                raise CheckpointError(f"{ORDERING}: expected an integer dtype (I64/I32), found {ordering_dtype}")
            if shape != (config.text.vocab_size,):
                raise CheckpointError(f"{ORDERING}: expected shape ({config.text.vocab_size},), found {shape}")
            ordering = reader.read(ORDERING)
            if ordering.min() < 0 or ordering.max() >= config.text.vocab_size:
                raise CheckpointError(f"{ORDERING}: token ids must lie in [0, {config.text.vocab_size}); found "
                                      f"[{int(ordering.min())}, {int(ordering.max())}]")
        build = lambda dt: Assistant(config, key=jax.random.key(0), dtype=dt, token_ordering_dtype=ordering_dtype)
        reader, abstract, dtype = open_checkpoint(folder, build, dtype, reader=reader)
        if ordering is not None:
            abstract = eqx.tree_at(lambda m: m.token_ordering, abstract, jnp.asarray(ordering.astype(np.int32)))
        return fill_model(abstract, reader, dtype, check_finite=check_finite)
    finally:
        opened.close()


def save_assistant(assistant: Assistant, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `assistant` as a transformers folder (config.json + model.safetensors), atomically as `g4.save`
    does, refusing the same targets (`save.check_target`; `overwrite` as there); the loaded tensors come back bit
    for bit (`token_ordering` in its stored integer dtype)."""
    check_target(folder, overwrite)
    specs = tensor_specs(assistant)
    layout = [(s.name, DTYPE_NAMES[np.dtype(s.leaf(assistant).dtype)], s.shape) for s in specs]
    extra = []
    if assistant.token_ordering is not None:
        arr = np.asarray(assistant.token_ordering).astype(_INT_DTYPES[assistant.token_ordering_dtype])
        layout.append((ORDERING, assistant.token_ordering_dtype, arr.shape))
        extra.append((ORDERING, arr))

    def tensors():
        yield from host_tensors(assistant, specs)
        yield from extra

    def write(staging: str) -> None:
        write_file(os.path.join(staging, "model.safetensors"), layout, tensors(), {"format": "pt"}, fsync=True)
        config = assistant.config.to_hf_dict()
        config["dtype"] = dtype_name(assistant.dtype)
        write_json(os.path.join(staging, CONFIG), config)

    replace_folder(folder, write, overwrite=overwrite)
