"""`g4.load("owner/name")` from a Hugging Face cache folder, offline, with clear errors and no network; progress."""

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.io import hub

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "tiny_a", "checkpoint")
REPO = "owner/tiny"
MAIN = "a" * 40
V1 = "b" * 40


def _add_snapshot(cache, repo_id, commit, files: dict[str, bytes], refs=()):
    """One snapshot laid out as huggingface_hub writes it: content-addressed blobs, symlinked snapshot files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE -> a cache holding owner/tiny at main (commit a...) and tag v1 (commit b..., bf16)."""
    cache = tmp_path / "hub"
    _add_snapshot(cache, REPO, MAIN, _files(TINY), refs=("main",))
    bf16 = tmp_path / "bf16"
    g4.save(g4.load(TINY, dtype="bfloat16"), bf16)
    _add_snapshot(cache, REPO, V1, _files(bf16), refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any request would fail
    return cache


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_repo_id_loads_offline_from_the_cache(offline_cache):
    _assert_same(g4.load(REPO), g4.load(TINY))


def test_revision_by_tag_and_by_commit(offline_cache):
    assert g4.load(REPO, revision="v1").dtype == np.dtype("bfloat16")
    assert g4.load(REPO, revision=V1).dtype == np.dtype("bfloat16")
    assert g4.load(REPO, revision=MAIN).dtype == np.dtype("float32")


def test_local_files_only_with_hf_home(tmp_path, monkeypatch):
    _add_snapshot(tmp_path / "home" / "hub", REPO, MAIN, _files(TINY), refs=("main",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.resolve(REPO, local_files_only=True) == str(tmp_path / "home" / "hub" / "models--owner--tiny" /
                                                           "snapshots" / MAIN)
    _assert_same(g4.load(REPO, local_files_only=True), g4.load(TINY))


def test_sharded_checkpoint_in_the_cache(tmp_path, offline_cache):
    sharded = tmp_path / "sharded"
    g4.save(g4.load(TINY), sharded, max_shard_size="200KB")
    _add_snapshot(offline_cache, "owner/sharded", MAIN, _files(sharded), refs=("main",))
    _assert_same(g4.load("owner/sharded"), g4.load(TINY))


def test_revision_not_cached_is_a_clear_error(offline_cache):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"owner/tiny@v9: revision 'v9' is not in the local Hugging Face "
                                                r"cache and offline mode is on .*refs \['main', 'v1'\]"):
        g4.load(REPO, revision="v9")
    assert time.perf_counter() - start < 5  # fails at once, no network wait


def test_repo_not_cached_is_a_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"owner/absent: revision 'main' is not in the local Hugging Face "
                                                r"cache .* holds no copy of owner/absent"):
        g4.load("owner/absent")


def test_missing_weights_file_is_named(offline_cache):
    _add_snapshot(offline_cache, "owner/noweights", MAIN, {"config.json": _files(TINY)["config.json"]},
                  refs=("main",))
    with pytest.raises(FileNotFoundError, match=r"owner/noweights: neither model.safetensors nor "
                                                r"model.safetensors.index.json is in the snapshot"):
        g4.load("owner/noweights")


def test_missing_shard_is_named(tmp_path, offline_cache):
    sharded = tmp_path / "sharded"
    g4.save(g4.load(TINY), sharded, max_shard_size="200KB")
    files = _files(sharded)
    index = json.loads(files["model.safetensors.index.json"])
    lost = sorted(set(index["weight_map"].values()))[1]
    del files[lost]
    _add_snapshot(offline_cache, "owner/partial", MAIN, files, refs=("main",))
    with pytest.raises(FileNotFoundError, match=f"owner/partial: {lost} \\(listed in model.safetensors.index.json\\) "
                                                "is missing from the snapshot"):
        g4.load("owner/partial")


def test_missing_config_is_named(offline_cache):
    _add_snapshot(offline_cache, "owner/noconfig", MAIN,
                  {"model.safetensors": _files(TINY)["model.safetensors"]}, refs=("main",))
    with pytest.raises(FileNotFoundError, match=r"owner/noconfig: config.json is missing from the snapshot"):
        g4.load("owner/noconfig")


def test_unreachable_hub_falls_back_to_the_cache(offline_cache, monkeypatch):
    """Online mode with the Hub unreachable (connection refused): the cached snapshot is used, quickly."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    folder = hub.resolve(REPO)
    assert folder.endswith(os.path.join("snapshots", MAIN))
    assert time.perf_counter() - start < 10


def test_a_folder_path_ignores_hub_arguments(offline_cache):
    assert hub.resolve(TINY, revision="v9", local_files_only=True) == TINY


def test_copy_of_the_cache_elsewhere_still_resolves(tmp_path, offline_cache, monkeypatch):
    """Snapshot links are relative, so a cache folder can be copied (e.g. onto an offline machine)."""
    moved = tmp_path / "moved"
    shutil.copytree(offline_cache, moved, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    _assert_same(g4.load(REPO), g4.load(TINY))


def test_progress_reports_every_byte():
    seen = []
    g4.load(TINY, progress=seen.append)
    data = os.path.getsize(os.path.join(TINY, "model.safetensors"))
    assert 0 < data - sum(seen) < 64 * 1024  # all tensor bytes; the rest is the header


def test_progress_bar_can_be_forced_on_and_off(capsys):
    g4.load(TINY, progress=True)
    assert "loading" in capsys.readouterr().err
    g4.load(TINY, progress=False)
    g4.load(TINY)  # a tiny checkpoint: no bar by default
    assert "loading" not in capsys.readouterr().err
