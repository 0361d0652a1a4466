"""`g4.surgery`: the model edits of `model.surgery` (swap attention, LoRA, freezing specs), and saving and loading
an edited model that has no transformers names (`save` / `load`: config.json + Equinox leaves in `model.eqx`).

The edits are re-exported from `model.surgery`, where they live; saving is here, in the I/O layer, so it is atomic
like `g4.save`. For LoRA alone, `g4.save_adapters` writes PEFT's format (a few MB) instead of the whole model.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Gemma4Config
from ..config.fields import ConfigError, read_json_file
from ..model.gemma4 import Gemma4
from ..model.surgery import *  # noqa: F403  (the edits: `g4.surgery.add_lora`, ...)
from ..model.surgery import __all__ as _edits
from ..utils.dtypes import dtype_name
from ..utils.files import Folder
from .save import fsync_path, mark_done, replace_folder, write_json

LEAVES_FILE = "model.eqx"
CONFIG_FILE = "config.json"


def save(model: Gemma4, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """config.json (with the dtype) + every leaf in `model.eqx` (`eqx.tree_serialise_leaves`), written as `g4.save`
    writes: into a staging folder, fsynced, swapped in whole (`io.save.replace_folder`: a crash leaves the old folder
    or the new one; dangerous targets refused; files of others kept, or refused by name where the switch would
    drop them, unless `overwrite`)."""

    def write(staging: str) -> None:
        write_json(os.path.join(staging, CONFIG_FILE), {**model.config.to_hf_dict(), "dtype": dtype_name(model.dtype)})
        path = os.path.join(staging, LEAVES_FILE)
        eqx.tree_serialise_leaves(path, model)
        fsync_path(path)
        mark_done(f"write {LEAVES_FILE}")

    replace_folder(folder, write, overwrite=overwrite)


def load(folder: str | os.PathLike, surgery: Callable[[Gemma4], Gemma4], *, dtype=None) -> Gemma4:
    """Load what `save` wrote. `surgery(stock_model) -> edited_model` must redo the edits (it runs abstractly,
    on shapes only, to build the skeleton the leaves are read into). config.json and model.eqx are opened
    through one descriptor of the folder (`utils.files.Folder`: regular files only, its symlink rule)."""
    with Folder(folder, "a folder written by g4.surgery.save") as opened:
        raw = read_json_file(CONFIG_FILE, ConfigError, folder=opened)
        try:
            config = Gemma4Config.from_hf_dict(raw)
            if dtype is None:
                dtype = jnp.dtype(raw.get("dtype", "float32"))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{opened.join(CONFIG_FILE)}: {e}") from None
        leaves = opened.open(LEAVES_FILE, "an Equinox leaves file (model.eqx)")
    like = eqx.filter_eval_shape(lambda: surgery(Gemma4(config, key=jax.random.key(0), dtype=dtype)))
    try:
        with leaves:
            model = eqx.tree_deserialise_leaves(leaves, like)
    except RuntimeError as e:  # a shape that differs from the skeleton
        raise ValueError(f"{folder}: {e}; `surgery` must rebuild the structure that was saved") from e
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(like), jax.tree.leaves(model)):
        if (want.shape, want.dtype) != (got.shape, got.dtype):
            raise ValueError(f"{jax.tree_util.keystr(path)}: the surgery builds {want.shape} {want.dtype}, "
                             f"the file holds {got.shape} {got.dtype}")
    return model


__all__ = [*_edits, "CONFIG_FILE", "LEAVES_FILE", "load", "save"]
