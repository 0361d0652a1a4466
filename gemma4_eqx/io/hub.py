"""`g4.load` / `g4.save`: a local folder or a Hugging Face Hub repo id, through `huggingface_hub`.

A repo id is resolved with `snapshot_download` (only the files a model load needs; `revision` a branch, tag or
commit; `token` from the argument, `HF_TOKEN` or the stored login). Offline mode, `HF_HUB_OFFLINE=1` or
`local_files_only=True`, reads the local cache only (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, laid out as
`models--owner--name/{blobs,refs,snapshots/<commit>/...}`) and fails at once, naming the repo and revision,
when the revision or a file is not there. The environment is read at each call, not at import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..model.serving import serving_layout
from . import checkpoint

# What a model load needs from a repo; tokenizer/processor files come along for `Processor.from_pretrained`.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "preprocessor_config.json")

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) as set now."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str:
    """The Hub cache folder as the environment names it now (huggingface_hub reads it only at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def _cached_revisions(cache: str, repo_id: str) -> str:
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    refs = sorted(os.listdir(os.path.join(repo, "refs"))) if os.path.isdir(os.path.join(repo, "refs")) else []
    snaps = sorted(os.listdir(os.path.join(repo, "snapshots"))) if os.path.isdir(os.path.join(repo, "snapshots")) else []
    if not refs and not snaps:
        return f"the cache {cache} holds no copy of {repo_id}"
    return f"the cache {cache} holds refs {refs} and snapshots {snaps}"


def _check_snapshot(folder: str, allow_patterns: Sequence[str], what: str) -> None:
    """The files a model load needs are in the snapshot (a partial cache fails here, not deep in the loader)."""
    patterns = set(allow_patterns)
    needed = ["config.json"] if "config.json" in patterns else []
    for file in needed:
        if not os.path.isfile(os.path.join(folder, file)):
            raise FileNotFoundError(f"{what}: {file} is missing from the snapshot {folder}")
    if "*.safetensors" in patterns:
        index = os.path.join(folder, checkpoint.SAFE_INDEX)
        if os.path.isfile(index):
            files = sorted(set(checkpoint.read_index(folder).values()))
            for file in files:
                if not os.path.isfile(os.path.join(folder, file)):
                    raise FileNotFoundError(f"{what}: {file} (listed in {checkpoint.SAFE_INDEX}) is missing from the "
                                            f"snapshot {folder}")
        elif not os.path.isfile(os.path.join(folder, checkpoint.SAFE_SINGLE)):
            raise FileNotFoundError(f"{what}: neither {checkpoint.SAFE_SINGLE} nor {checkpoint.SAFE_INDEX} is in "
                                    f"the snapshot {folder}")


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None, allow_patterns: Sequence[str] = MODEL_FILES,
            cache_dir: str | None = None) -> str:
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
        left = checkpoint.leftovers(path)
        hint = (f"; an interrupted save left {left[0]} (the previous checkpoint or an unfinished new one: check it, "
                f"then rename it to {path})" if left else "")
        raise FileNotFoundError(f"{path}: no such folder, and not a Hub repo id of the form 'owner/name'{hint}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    offline = offline_mode() if local_files_only is None else bool(local_files_only)
    cache = cache_dir or hub_cache_dir()
    what = path + (f"@{revision}" if revision else "")
    why = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
           else "the Hub cannot be reached")
    try:
        folder = snapshot_download(path, revision=revision, token=token, allow_patterns=list(allow_patterns),
                                   local_files_only=offline, cache_dir=cache)
    except IncompleteSnapshotError as e:
        raise FileNotFoundError(f"{what}: the cached snapshot is incomplete and {why} ({e})") from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{what}: revision {revision or 'main'!r} is not in the local Hugging Face cache "
                                f"and {why}; {_cached_revisions(cache, path)}") from e
    _check_snapshot(folder, allow_patterns, what)
    return folder


LAYOUTS = ("stored", "serving")


def load(path_or_repo_id: str | os.PathLike, *, dtype: Any = None, revision: str | None = None,
         token: str | bool | None = None, local_files_only: bool | None = None, cache_dir: str | None = None,
         remat: bool | str = False, attention_implementation: str = "xla", numerics: str = "xla", mesh: Any = None,
         rules: Any = None, progress: Any = None, quantize: Any = None, check_finite: bool = True,
         layout: str = "stored") -> Any:
    """Load a transformers-format Gemma 4 Unified checkpoint into a `Gemma4`.

    `layout="stored"` (default): the checkpoint's own shapes, one array per HF tensor, the decoder stacked per run
    (what training, LoRA, surgery, sharding rules, the bridge and `g4.save` work on). `layout="serving"`: the same
    model laid out for fast decoding (`g4.serving_layout`: every layer in its own arrays, the MLP's gate and up
    fused), converted as it is loaded without holding two copies; the CLI, the chat command and the server load
    this way. Generation gives the same tokens either way; `g4.save` writes transformers' tensors from both.

    `dtype=None` keeps the checkpoint's precision (bit-exact); `dtype=jnp.bfloat16` etc. casts on load.
    `mesh=` (a `jax.sharding.Mesh`, see `g4.sharding.make_mesh`) places every parameter with the sharding that
    `rules` name (default `g4.sharding.FSDP_TP`), each device reading only its rows of the checkpoint.
    Tensors are read one at a time, so host memory stays near the largest leaf plus what the model keeps on
    the host. `progress`: a tqdm bar over bytes and tensors; `None` shows it for checkpoints of 1 GiB or more.
    `remat`, `attention_implementation` and `numerics` are passed to `Gemma4` (see
    `Gemma4.with_attention_implementation`, `Gemma4.with_numerics`). `dtype` must be a floating dtype.
    `quantize="int8" | "int4"` (or a `g4.quant.QuantConfig`) quantizes the decoder projections tensor by tensor
    as they are read (`g4.quant`); a folder saved quantized loads quantized without it.
    Every tensor is checked finite as it is read (quantized scales finite, codes in range): a NaN or infinite
    weight raises `CheckpointError` naming the tensor and its file; `check_finite=False` skips the float check
    (it costs a few percent of the load time). The folder's files are opened together before anything is read,
    so a save into the same folder meanwhile is seen whole or not at all; symlinks in the folder are followed
    only into the folder itself or, in a Hub cache snapshot, into its `blobs/` (`utils.files.FOLDER_LINK_RULE`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, found {layout!r}")
    checkpoint.float_dtype(dtype)  # before any download: an integer dtype would truncate the weights
    folder = resolve(path_or_repo_id, revision=revision, token=token, local_files_only=local_files_only,
                     cache_dir=cache_dir)
    model_kwargs = {"remat": remat, "attention_implementation": attention_implementation, "numerics": numerics}
    model = checkpoint.load_from_folder(folder, dtype=dtype, model_kwargs=model_kwargs, mesh=mesh, rules=rules,
                                        progress=progress, quantize=quantize, check_finite=check_finite)
    return serving_layout(model, consume=True) if layout == "serving" else model


def save(model: Any, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB", processor: Any = None,
         generation_config: dict[str, Any] | None = None, overwrite: bool = False) -> None:
    """A complete transformers-format folder, written atomically: HF-named safetensors (sharded with an index
    above `max_shard_size`), config.json, generation_config.json (`generation_config`, else the folder's own,
    else one from the config) and, given `processor`, its tokenizer/processor files.

    The folder holds the complete old checkpoint or the complete new one at every instant, even if the process
    is killed or the disk fills (see `gemma4_eqx.io.save`). A sharded model is gathered one tensor at a
    time as it is written.

    A save replaces only its own files: the folder's other files are kept, but one it would have to delete
    without having written it (another model's `*.safetensors`, an adapter's weights) is refused by name unless
    `overwrite=True`. "", `/`, system folders and the home or working directory are refused outright.
    """
    checkpoint.save(model, folder, max_shard_size=max_shard_size, processor=processor,
                    generation_config=generation_config, overwrite=overwrite)
