"""A save over an existing checkpoint never loses it: killed (SIGKILL) after any file operation of the writer,
out of disk space (ENOSPC injected, or a file-size limit), the folder loads as the old model or the new one, bit
for bit, config included, and nothing half-written is left that a load could take for a checkpoint.

The old checkpoint is the bundled tiny one (single file); the new one is the same architecture with other
weights and another config.json (extra eos id), written as shards, so a mix of old and new would show.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.io import save as checkpoint_save
from gemma4_eqx.assets import TINY_CHECKPOINT

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARD = "400KB"  # the new checkpoint in several shards plus an index
CHILD = """
import os, signal, sys
import gemma4_eqx as g4  # imported once: each save below runs in a fork of this process
from gemma4_eqx.io import save as checkpoint_save
src, shard, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
for kill_at, target in enumerate(targets, start=1):
    pid = os.fork()
    if pid == 0:  # no JAX backend (so no XLA thread) exists before this point: forking is safe
        model = g4.load(src)
        calls = [0]
        def hook(step):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint_save.FAULT_HOOK = hook
        g4.save(model, target, max_shard_size=shard)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(kill_at, status, flush=True)  # the raw wait status
"""


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(model)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(old folder, new source folder, old leaves, new leaves, old config, new config)."""
    base = tmp_path_factory.mktemp("models")
    old_dir = base / "old"
    shutil.copytree(TINY_CHECKPOINT, old_dir)
    old = g4.load(old_dir)
    new = jax.tree.map(lambda x: x * 1.5 + 0.25 if isinstance(x, jax.Array) and x.dtype == jnp.float32 else x, old)
    new_dir = base / "new"
    g4.save(new, new_dir, max_shard_size=SHARD)
    old.config.replace(eos_token_id=(1, 106, 7)).save_pretrained(new_dir, dtype="float32")  # another config.json
    assert len(json.loads((new_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return (old_dir, new_dir, _leaves(old), _leaves(new), json.loads((old_dir / "config.json").read_text()),
            json.loads((new_dir / "config.json").read_text()))


def _state(folder: pathlib.Path, models, carried: bool = True) -> str:
    """'old' or 'new' when the folder loads as exactly one of them (weights and config); fails otherwise."""
    _, _, old_leaves, new_leaves, old_cfg, new_cfg = models
    names = os.listdir(folder)
    assert not [n for n in names if n.endswith(".partial")], names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a staging leftover beside the folder is named, not read
        loaded = _leaves(g4.load(folder))
    config = json.loads((folder / "config.json").read_text())
    for name, leaves, cfg in (("old", old_leaves, old_cfg), ("new", new_leaves, new_cfg)):
        if len(leaves) == len(loaded) and all(a.dtype == b.dtype and a.tobytes() == b.tobytes()
                                              for a, b in zip(leaves, loaded)):
            assert config == cfg, f"{name} weights with another config.json"
            if name == "old":  # the old checkpoint is untouched: no new shard or index beside it
                assert "model.safetensors.index.json" not in names and not any(n.startswith("model-") for n in names)
            else:
                assert "model.safetensors" not in names  # the old single file went with the old checkpoint
            assert "generation_config.json" in names
            for kept in ("tokenizer.json", "chat_template.jinja", "hf_reference.npz") if carried else ():
                assert kept in names, f"{kept} lost ({name} state)"
            return name
    raise AssertionError(f"{folder} loads as neither the old nor the new checkpoint")


def _steps(models, tmp_path, fresh: bool = False) -> list[str]:
    """The labels of every file operation of one save over the old checkpoint (or into a new folder)."""
    old_dir, new_dir, *_ = models
    target = tmp_path / "count"
    if not fresh:
        shutil.copytree(old_dir, target)
    steps: list[str] = []
    checkpoint_save.FAULT_HOOK = steps.append
    try:
        g4.save(g4.load(new_dir), target, max_shard_size=SHARD)
    finally:
        checkpoint_save.FAULT_HOOK = None
    assert _state(target, models, carried=not fresh) == "new"
    return steps


def test_the_writer_reports_every_file_operation(models, tmp_path):
    steps = _steps(models, tmp_path)
    assert steps[0] == "mkdir staging" and steps[-1] == "remove old"
    assert "exchange" in steps and "write config.json" in steps and "carry tokenizer.json" in steps
    assert sum(s.startswith("write model-") for s in steps) > 1


def test_sigkill_after_any_file_operation_leaves_old_or_new(models, tmp_path):
    old_dir, new_dir, *_ = models
    steps = _steps(models, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    targets = []
    for k in range(1, len(steps) + 1):
        targets.append(tmp_path / f"kill{k}")
        shutil.copytree(old_dir, targets[-1])
    run = subprocess.run([sys.executable, "-c", CHILD, str(new_dir), SHARD, *map(str, targets)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    statuses = dict(map(int, line.split()) for line in run.stdout.split("\n") if line.strip())
    signals = {k: os.WTERMSIG(v) if os.WIFSIGNALED(v) else f"exit {os.WEXITSTATUS(v)}" for k, v in statuses.items()}
    seen = []
    for k, target in enumerate(targets, start=1):
        assert signals[k] == signal.SIGKILL, (k, steps[k - 1], signals[k], run.stderr[-2000:])
        state = _state(target, models)
        switched = steps.index("exchange") < k
        assert state == ("new" if switched else "old"), (k, steps[k - 1], state)
        seen.append(state)
        if k < len(steps):  # killed before the old checkpoint was removed: the leftover is named on load
            with pytest.warns(UserWarning, match="leftovers of an interrupted or running save"):
                g4.load(target)
    assert "old" in seen and "new" in seen


@pytest.mark.parametrize("fresh", [False, True])
def test_enospc_at_any_file_operation_keeps_the_folder_whole(models, tmp_path, fresh):
    old_dir, new_dir, *_ = models
    steps = _steps(models, tmp_path, fresh)
    switch = steps.index("rename staging" if fresh else "exchange")
    new = g4.load(new_dir)
    for k, step in enumerate(steps, start=1):
        target = tmp_path / f"full{k}"
        if not fresh:
            shutil.copytree(old_dir, target)
        calls = [0]

        def hook(label: str) -> None:
            calls[0] += 1
            if calls[0] == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), label)

        checkpoint_save.FAULT_HOOK = hook
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                g4.save(new, target, max_shard_size=SHARD)
            failed = None
        except OSError as e:
            failed = e
        finally:
            checkpoint_save.FAULT_HOOK = None
        if step == "remove old":  # after the switch: the save succeeded, only the cleanup failed (a warning)
            assert failed is None and any("could not be removed" in str(w.message) for w in caught)
        else:
            assert failed is not None and failed.errno == errno.ENOSPC, (step, failed)
        switched = k > switch
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith(f".full{k}.g4-save-")]
        assert not leftovers, (step, leftovers)  # the staging folder is removed on an error
        if not switched:
            assert "keeps its previous contents" in str(failed)
        if fresh and not switched:
            assert not target.exists(), step
            continue
        assert _state(target, models, carried=not fresh) == ("new" if switched else "old"), step


def test_a_file_size_limit_mid_write_keeps_the_old_checkpoint(models, tmp_path):
    old_dir, new_dir, *_ = models
    target = tmp_path / "limited"
    shutil.copytree(old_dir, target)
    script = ("import resource, signal, sys\n"
              "import gemma4_eqx as g4\n"
              "model = g4.load(sys.argv[1])\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
              "try:\n"
              "    g4.save(model, sys.argv[2], max_shard_size='1MB')\n"
              "except OSError as e:\n"
              "    print(e); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script, str(new_dir), str(target)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "keeps its previous contents" in run.stdout and "File too large" in run.stdout
    assert _state(target, models) == "old"
    assert not [n for n in os.listdir(tmp_path) if ".g4-save-" in n]


def test_save_keeps_the_folders_other_files_and_drops_stale_shards(models, tmp_path):
    old_dir, new_dir, *_ = models
    target = tmp_path / "t"
    shutil.copytree(new_dir, target)  # sharded
    (target / "README.md").write_text("my notes")
    (target / "extra").mkdir()
    (target / "extra" / "a.txt").write_text("a")
    g4.save(g4.load(old_dir), target)  # single file over shards
    names = sorted(os.listdir(target))
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith("model-")]
    assert (target / "README.md").read_text() == "my notes" and (target / "extra" / "a.txt").read_text() == "a"
    assert not [n for n in os.listdir(tmp_path) if ".g4-save-" in n]


def test_save_without_the_atomic_exchange_still_switches_whole(models, tmp_path, monkeypatch):
    old_dir, new_dir, *_ = models
    target = tmp_path / "t"
    shutil.copytree(old_dir, target)
    monkeypatch.setattr(checkpoint_save, "_exchange", lambda a, b: False)
    g4.save(g4.load(new_dir), target, max_shard_size=SHARD)
    assert _state(target, models) == "new"
    assert not [n for n in os.listdir(tmp_path) if ".g4-save-" in n]


def test_save_through_a_symlink_replaces_the_folder_it_points_at(models, tmp_path):
    old_dir, new_dir, *_ = models
    real = tmp_path / "real"
    shutil.copytree(old_dir, real)
    (tmp_path / "link").symlink_to(real)
    g4.save(g4.load(new_dir), tmp_path / "link", max_shard_size=SHARD)
    assert (tmp_path / "link").is_symlink() and _state(real, models) == "new"


def test_save_onto_a_file_is_refused(models, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(g4.CheckpointError, match="exists and is not a folder"):
        g4.save(g4.load(models[0]), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_a_missing_folder_with_a_save_leftover_beside_it_is_named(tmp_path):
    (tmp_path / ".ckpt.g4-save-0123abcd").mkdir()
    with pytest.raises(FileNotFoundError, match=r"interrupted save left .*\.ckpt\.g4-save-0123abcd"):
        g4.load(tmp_path / "ckpt")
