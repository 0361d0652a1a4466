"""What a folder holds, for the loaders' error messages: a transformers checkpoint (`g4.load`), a PEFT adapter
(`g4.load_adapters`, `io.adapters`) or `g4.surgery.save`'s leaves (`g4.surgery.load`)."""

from __future__ import annotations

import os

from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SAFE_INDEX,
    SAFE_SINGLE,
    CheckpointError,
)
from .surgery import LEAVES_FILE

CONFIG = "config.json"


def refuse_non_checkpoint(folder: str | os.PathLike) -> None:
    """`CheckpointError` naming what `folder` is and how to load it when it is an adapter folder or a
    `g4.surgery.save` folder rather than a transformers checkpoint; nothing otherwise."""
    folder = os.fspath(folder)
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if has(ADAPTER_CONFIG) and not has(CONFIG):
        raise CheckpointError(f"{folder}: an adapter folder ({ADAPTER_CONFIG}"
                              f"{' + ' + ADAPTER_WEIGHTS if has(ADAPTER_WEIGHTS) else ''}, no config.json or model "
                              f"weights), not a model checkpoint; load its base model and put the adapters on it: "
                              f"g4.load_adapters(g4.load(BASE), {folder!r})")
    if has(LEAVES_FILE) and not has(SAFE_SINGLE) and not has(SAFE_INDEX):
        raise CheckpointError(f"{folder}: holds {LEAVES_FILE} (written by g4.surgery.save), not transformers-format "
                              f"weights; read it with g4.surgery.load({folder!r}, surgery), `surgery` redoing the "
                              "edits on the stock model")
