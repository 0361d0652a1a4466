"""`g4.load` / `g4.save`: a local folder or a Hugging Face Hub repo id, through `huggingface_hub`."""

from __future__ import annotations

import os

from . import checkpoint

# What a model load needs from a repo; tokenizer/processor files come along for `Processor.from_pretrained`.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "preprocessor_config.json")


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None, allow_patterns=MODEL_FILES) -> str:
    """A local folder as is; otherwise a Hub repo id resolved to a snapshot folder in the local cache.

    Offline mode (`HF_HUB_OFFLINE=1` or `local_files_only=True`) uses the cache only and fails at once with a
    clear error when the files or the revision are not there.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path}: expected a checkpoint folder or a Hub repo id, found a file")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: no such folder, and not a Hub repo id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(path, revision=revision, token=token, allow_patterns=list(allow_patterns),
                                 local_files_only=local_files_only if local_files_only is not None else False)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{path}" + (f"@{revision}" if revision else "") +
                                f": not in the local Hugging Face cache and the Hub cannot be reached ({e})") from e


def load(path_or_repo_id: str | os.PathLike, *, dtype=None, revision: str | None = None,
         token: str | bool | None = None, local_files_only: bool | None = None, remat: bool = False):
    """Load a transformers-format Gemma 4 Unified checkpoint into a `Gemma4`.

    `dtype=None` keeps the checkpoint's precision (bit-exact); `dtype=jnp.bfloat16` etc. casts on load.
    """
    folder = resolve(path_or_repo_id, revision=revision, token=token, local_files_only=local_files_only)
    return checkpoint.load_from_folder(folder, dtype=dtype, model_kwargs={"remat": remat})


def save(model, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """config.json + HF-named safetensors (sharded with an index above `max_shard_size`)."""
    checkpoint.save(model, folder, max_shard_size=max_shard_size)
