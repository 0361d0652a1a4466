"""Checkpoint writing: a model (with its processor files and generation settings) into a transformers-format
folder, atomically.

The save protocol (`replace_folder`):
1. everything is written into a staging folder beside the target, `.NAME.g4-save-<token>` (same file system),
   each file fsynced as it is closed;
2. the files of the old folder that this save does not write (a README, recorded references, processor files
   when no processor is given) are hard-linked in; weights and indexes of the old checkpoint never are;
3. the staging folder is fsynced, then exchanged with the target in one `renameat2(RENAME_EXCHANGE)` and the
   parent fsynced: up to the exchange the target is the old checkpoint untouched, from it on the new one whole
   (weights, config.json and the rest switch together);
4. the old checkpoint, now under the staging name, is deleted last.
A crash at any point leaves the target whole (old or new) plus, at worst, a `.NAME.g4-save-*` sibling that
`load` names in a warning. Where the exchange does not exist (not Linux, or a file system without it) the target
is renamed aside and the staging folder renamed in; a crash between those two renames leaves no target but the
complete old checkpoint beside it (`g4.load` points at it).

What a save may replace (`check_target`, before anything is written, and again just before the switch):
- dangerous targets are refused: "" (the working directory), `/`, a system folder (`/usr`, `/etc`, `/bin`, ...),
  the home or working directory or a folder holding either, a mount point;
- the target's own files are those a save writes (`is_ours`: `model.safetensors`, `model-NNNNN-of-NNNNN.safetensors`,
  the index, config.json, generation_config.json, the processor's files, and the save's temporaries
  `*.partial` of those and `config.json.*.tmp`); a save drops the old weights, indexes and temporaries and keeps
  (hard-links into the new folder) every other entry. Any other file it would drop (`other-model.safetensors`,
  an adapter's `adapter_model.safetensors`, a stray `*.partial`) is refused by name, unless `overwrite=True`;
- stale temporaries (`*.partial`, `config.json.*.tmp`) are never carried into the new folder.

`FAULT_HOOK`, when set, is called with a label after every file operation: the fault-injection tests kill the
process or raise there.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import secrets
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from .load import PARTIAL_SUFFIX, SAVE_MARK
from .names import SAFE_INDEX, SAFE_SINGLE, SHARD_FILE, CheckpointError, TensorSpec, tensor_specs
from .safetensors import DTYPE_NAMES, write_file

GENERATION_CONFIG = "generation_config.json"
CONFIG = "config.json"
# The processor's files (what `Processor.from_pretrained` and transformers' `AutoProcessor` read).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                   "special_tokens_map.json", "preprocessor_config.json")

FAULT_HOOK: Callable[[str], None] | None = None  # tests only: called after every file operation of a save


def mark_done(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


# ---- sizes and tensors ---------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """`5GB`, `100KB`, `2GiB` or a number of bytes, as a positive number of bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    problem = f"max_shard_size: expected a positive size such as '5GB', '500MB' or a number of bytes, found {size!r}"
    if isinstance(size, bool):
        raise ValueError(problem)
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        s = size.strip().upper()
        mult = 1
        for unit, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if s.endswith(unit):
                s, mult = s[: -len(unit)].strip(), m
                break
        try:
            number = float(s)
            value = int(number * mult) if math.isfinite(number) else -1
        except ValueError:
            raise ValueError(problem) from None
    else:
        raise ValueError(problem)
    if value <= 0:
        raise ValueError(problem)
    return value


@jax.jit
def take_layer(leaf: jax.Array, index: jax.Array) -> jax.Array:
    """One layer's slice of a stacked leaf, on the leaf's devices (traced indices: one compile per leaf shape)."""
    n = index.shape[0]
    start = (*index, *(0,) * (leaf.ndim - n))
    return jax.lax.dynamic_slice(leaf, start, (1,) * n + leaf.shape[n:]).reshape(leaf.shape[n:])


def host_tensors(model: Any, specs: list[TensorSpec] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(on-disk name, `[out, in]` host array) for every tensor, fetched from its devices one tensor at a time.

    A stacked leaf is sliced on its devices first, so a sharded model is gathered one layer's tensor at a time.
    """
    for s in specs if specs is not None else tensor_specs(model):
        leaf = s.leaf(model)
        t = leaf if not s.index else take_layer(leaf, np.asarray(s.index, np.int32))
        t = np.asarray(jax.device_get(t))
        yield s.name, np.ascontiguousarray(t.T if s.transpose else t)


def plan_shards(model: Any, max_shard_size: int | str) -> list[list[tuple[TensorSpec, str]]]:
    """The tensors of each file, (spec, safetensors dtype name), planned from the shapes alone."""
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[TensorSpec, str]]] = [[]]
    size = 0
    for s in tensor_specs(model):
        dtype = np.dtype(s.leaf(model).dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{s.name}: dtype {dtype} cannot be written to safetensors")
        nbytes = math.prod(s.shape) * dtype.itemsize
        if size and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((s, DTYPE_NAMES[dtype]))
        size += nbytes
    return shards


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """A JSON file written and fsynced (inside a staging folder: it becomes visible only with the folder)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    mark_done(f"write {os.path.basename(path)}")


def write_float_safetensors(model: Any, folder: str, max_shard_size: int | str = "5GB") -> list[str]:
    """Write a float model's HF-named safetensors into `folder`: one file, or shards plus
    `model.safetensors.index.json` above the size. Nothing already in `folder` is removed: `save` calls this on a
    fresh staging folder.

    The layout is planned from the shapes alone; tensors are then fetched and written one at a time, so host
    memory stays near the largest tensor whatever the model's size or sharding. Each file is fsynced.
    """
    shards = plan_shards(model, max_shard_size)
    os.makedirs(folder, exist_ok=True)
    files = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        layout = [(s.name, d, s.shape) for s, d in shard]
        total += write_file(os.path.join(folder, file), layout, host_tensors(model, [s for s, _ in shard]),
                            {"format": "pt"}, fsync=True)
        mark_done(f"write {file}")
        weight_map.update({s.name: file for s, _ in shard})
    if len(shards) > 1:
        write_json(os.path.join(folder, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def default_generation_config(config: Any) -> dict[str, Any]:
    """A generation_config.json for a model saved without one: the config's special ids, eoi/eoa suppressed
    (docs/spec/processors.md §7.1) and the sampling settings Gemma 4 ships with."""
    text = config.text
    return {"bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id,
            "eos_token_id": list(config.eos_token_id or text.eos_token_id),
            "suppress_tokens": [config.eoa_token_id, config.eoi_token_id],
            "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}


# ---- the atomic switch ---------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", PARTIAL_SUFFIX)) or name in (SAFE_INDEX, SAFE_SINGLE)


def _is_temporary(name: str) -> bool:
    """A save's temporaries: `X.partial` (a weight file being written), `config.json.<pid>.tmp`
    (`Gemma4Config.save_pretrained`): never carried into a new folder."""
    return name.endswith(PARTIAL_SUFFIX) or (name.startswith(CONFIG + ".") and name.endswith(".tmp"))


def _dropped(name: str) -> bool:
    """What a save does not carry over from the folder it replaces: old weights, indexes and temporaries."""
    return _is_weights(name) or _is_temporary(name)


OUR_FILES = frozenset((SAFE_SINGLE, SAFE_INDEX, CONFIG, GENERATION_CONFIG, *PROCESSOR_FILES, "chat_template.json",
                       "video_preprocessor_config.json"))


def is_ours(name: str) -> bool:
    """A name a save writes (weights, shards, index, configs, processor files) or one of its temporaries."""
    if name.startswith(CONFIG + ".") and name.endswith(".tmp"):
        return True
    if name.endswith(PARTIAL_SUFFIX):
        name = name[:-len(PARTIAL_SUFFIX)]
    return name in OUR_FILES or SHARD_FILE.fullmatch(name) is not None


def foreign_dropped(folder: str, written: set[str] = frozenset()) -> list[str]:
    """The entries of `folder` that a save would drop (not carry over, not overwrite with its own) although it
    did not write them: another model's or an adapter's `*.safetensors`, a stray `*.partial`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _dropped(n) and n not in written and not is_ours(n))


# Folders a save never replaces (with every folder holding the home or working directory, and mount points).
SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
                  "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr",
                  "/usr/bin", "/usr/lib", "/usr/local", "/usr/local/bin", "/usr/share", "/var", "/var/tmp",
                  "/Applications", "/Library", "/System", "/Users", "/Volumes", "/private", "/private/tmp")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(folder: str | os.PathLike, overwrite: bool = False, what: str = "folder") -> str:
    """The real path a model save into `folder` replaces, after the checks of the module docstring
    (`CheckpointError` naming `what` and the folder: a dangerous target, a file, or files of others that the save
    would drop, unless `overwrite`)."""
    target = check_destination(folder, what)
    foreign = foreign_dropped(target) if os.path.isdir(target) else []
    if foreign and not overwrite:
        raise foreign_error(target, foreign)
    return target


def check_destination(folder: str | os.PathLike, what: str = "folder") -> str:
    """The real path of `folder` as a folder a save may replace: "", `/`, system folders, the home or working
    directory (or a folder holding one), a file and a mount point refused (`CheckpointError` naming `what`)."""
    given = os.fspath(folder)
    if isinstance(given, bytes):
        given = os.fsdecode(given)
    if not given.strip():
        raise CheckpointError(f"{what}: {given!r} is empty, which would name the working directory; name the "
                              "checkpoint folder to write")
    target = os.path.realpath(os.path.abspath(os.path.expanduser(given)))
    refuse = f"{what} {given}: refused, a save replaces the whole folder {target}"
    cwd, home = os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))
    system = {os.path.realpath(p) for p in SYSTEM_FOLDERS} | set(SYSTEM_FOLDERS)
    if target in system:
        raise CheckpointError(f"{refuse}, and it is a system folder; write into a folder of its own")
    for name, held in (("working directory", cwd), ("home directory", home)):
        if _within(held, target):
            where = "is" if held == target else "holds"
            raise CheckpointError(f"{refuse}, and it {where} the {name} ({held}); write into a folder of its own, "
                                  "e.g. a new sub-folder")
    if os.path.exists(target) and not os.path.isdir(target):
        raise CheckpointError(f"{target}: exists and is not a folder; expected a checkpoint folder to write")
    if os.path.isdir(target) and os.path.ismount(target):
        raise CheckpointError(f"{refuse}, and it is a mount point (it cannot be swapped atomically); write into a "
                              "folder inside it")
    return target


def foreign_error(target: str, foreign: list[str]) -> CheckpointError:
    shown = ", ".join(foreign[:10]) + (f" (and {len(foreign) - 10} more)" if len(foreign) > 10 else "")
    return CheckpointError(f"{target}: holds files this save would delete that it did not write: {shown}; a save "
                           "replaces only its own weights, index and configs. Move them away, write into another "
                           "folder, or pass overwrite=True (gemma4-eqx convert --overwrite) to delete them")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, staging: str, overwrite: bool = False) -> None:
    """Hard-link into `staging` every entry of `old` the save did not write, except old weights, indexes and
    temporaries; refused (before anything is linked) when it would drop files of others, unless `overwrite`."""
    written = set(os.listdir(staging))
    foreign = foreign_dropped(old, written)
    if foreign and not overwrite:
        raise foreign_error(old, foreign)
    for name in sorted(os.listdir(old)):
        if name in written or _dropped(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(staging, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
        mark_done(f"carry {name}")


def replace_folder(target: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """Run `write(staging_folder)`, then make `target` hold exactly what it wrote (plus the old folder's
    non-checkpoint files) in one atomic switch; see the module docstring. On failure `target` is untouched.
    Dangerous targets are refused first (`check_destination`); files of others that the switch would drop (not
    written by `write`, not `is_ours`) are refused before the switch, unless `overwrite` (callers that know what
    they write, like `checkpoint.save`, run `check_target` before writing anything)."""
    target = check_destination(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}{SAVE_MARK}{secrets.token_hex(4)}")
    os.mkdir(staging)
    switched = False
    try:
        mark_done("mkdir staging")
        write(staging)
        existed = os.path.isdir(target)
        if existed:
            _carry_over(target, staging, overwrite)
            os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        fsync_path(staging)
        mark_done("fsync staging")
        if not existed:
            os.rename(staging, target)
            switched = True
            mark_done("rename staging")
            fsync_path(parent)
            mark_done("fsync parent")
            return
        if _exchange(staging, target):
            switched = True
            mark_done("exchange")
        else:  # no atomic exchange here: rename aside, then in (a crash between leaves the old one beside)
            os.rename(target, staging + "-old")
            mark_done("rename target aside")
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(staging + "-old", target)
                raise
            switched = True
            os.rename(staging + "-old", staging)
            mark_done("rename staging in")
        fsync_path(parent)
        mark_done("fsync parent")
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)  # before the switch the new files, after it the old ones
        if not switched and isinstance(e, OSError):
            raise OSError(e.errno, f"{target}: the save failed ({e}); the folder keeps its previous contents") from e
        raise
    try:
        shutil.rmtree(staging)  # the old checkpoint
        mark_done("remove old")
    except OSError as e:
        warnings.warn(f"{target}: saved, but the previous checkpoint at {staging} could not be removed ({e})",
                      stacklevel=3)
