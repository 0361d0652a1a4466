"""Processor folders: finding one (a folder or a Hub repo id), reading its JSON, writing one back.

Every file of processing/ is read through `gemma4_eqx.utils.files` (regular files only, a size limit per kind of
file below, UTF-8, JSON with a nesting limit): a FIFO, device or directory in place of a file, a file larger than
its limit, invalid UTF-8 or JSON each raise `FileReadError` (a ValueError) naming the file.

`save_processor` writes what transformers' Gemma4UnifiedProcessor reads (tokenizer.json, tokenizer_config.json,
chat_template.jinja, processor_config.json), each file under a temporary name renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..utils.files import FileMissingError, read_folder_json

# Size limits of what a processor folder or a caller hands us (the real files are far smaller: the 12B's
# tokenizer.json ~32 MB, tokenizer_config.json and processor_config.json a few kB, its chat template 15 kB).
MAX_CONFIG_BYTES = 8 << 20      # processor_config.json, preprocessor_config.json, tokenizer_config.json, chat_template.json
MAX_TOKENIZER_BYTES = 128 << 20  # tokenizer.json
MAX_TEMPLATE_BYTES = 1 << 20     # chat_template.jinja (and a template's length in characters, wherever it comes from)
MAX_IMAGE_BYTES = 256 << 20      # an image file (PIL also refuses decompression bombs by pixel count)
MAX_AUDIO_BYTES = 1 << 30        # an audio file (read whole, as float32 samples)
MAX_VIDEO_BYTES = 16 << 30       # a video file (decoded frame by frame; only the sampled frames are kept)
# Folders already warned about falling back to the built-in chat template (the warning is once per folder).
WARNED_BUILTIN: set[str] = set()
# What a processor may read from a Hub repo.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "preprocessor_config.json",
                   "video_preprocessor_config.json")


def resolve_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                   local_files_only: bool | None = None) -> Path:
    """A processor folder, or a Hub repo id resolved (offline-aware) through `gemma4_eqx.hub.resolve`."""
    from ..io import hub

    path = os.fspath(path_or_repo_id)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: expected a processor folder (tokenizer.json, tokenizer_config.json, "
                                 "processor_config.json, chat_template.jinja) or a Hub repo id, found a file")
    folder = Path(hub.resolve(path, revision=revision, token=token, local_files_only=local_files_only,
                              allow_patterns=PROCESSOR_FILES))
    if not os.path.lexists(folder / "tokenizer.json"):  # one that is there but no regular file is refused when read
        raise FileNotFoundError(f"{folder}: no tokenizer.json, so this is no processor folder (expected tokenizer.json, "
                                "tokenizer_config.json, processor_config.json and chat_template.jinja)")
    return folder


def component_config(component: Any, type_key: str, type_name: str) -> dict:
    """One sub-processor's section of processor_config.json: its type name and its fields (None ones left out)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(component).items()}
    return {type_key: type_name, **{k: v for k, v in values.items() if v is not None or k == "num_frames"}}


def read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """An optional JSON object file of a processor folder: {} when there is none; `FileReadError` naming the file
    when it is no regular file, larger than `max_bytes`, not UTF-8, not valid JSON, too deeply nested or no object."""
    try:
        return read_folder_json(path, max_bytes, expect=dict, what="a JSON object file")
    except FileMissingError:
        return {}


def processor_config(proc: Any) -> dict:
    """processor_config.json as transformers' Gemma4UnifiedProcessor reads it."""
    return {
        "processor_class": "Gemma4UnifiedProcessor",
        "image_seq_length": proc.image_seq_length,
        "audio_seq_length": proc.audio_seq_length,
        "audio_ms_per_token": proc.audio_ms_per_token,
        "image_processor": component_config(proc.image_processor, "image_processor_type",
                                             "Gemma4UnifiedImageProcessor"),
        "video_processor": component_config(proc.video_processor, "video_processor_type",
                                             "Gemma4UnifiedVideoProcessor"),
        "feature_extractor": component_config(proc.feature_extractor, "feature_extractor_type",
                                               "Gemma4UnifiedAudioFeatureExtractor"),
    }


def save_processor(proc: Any, folder: str | os.PathLike) -> list[str]:
    """Write `proc`'s four files into `folder` (created if needed); no file is ever left half written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in proc.tokenizer.config.items() if k != "chat_template"}
    files = {
        "tokenizer.json": proc.tokenizer.backend.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "chat_template.jinja": proc.chat_template,
        "processor_config.json": json.dumps(processor_config(proc), indent=2) + "\n",
    }
    temps = {name: folder / f".{name}.tmp-{os.getpid()}" for name in files}
    try:
        for name, text in files.items():
            temps[name].write_text(text, encoding="utf-8")
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return [str(folder / name) for name in files]
