"""Hostile checkpoint folders: shard paths that leave the folder, broken indexes and configs, integer dtypes.
Every refusal is a `CheckpointError` / `ConfigError` / `ValueError` naming the file and field, never a bare
`KeyError` or `JSONDecodeError`, and never showing a foreign file's bytes."""

from __future__ import annotations

import json
import shutil
import struct

import jax.numpy as jnp
import pytest

import gemma4_eqx as g4
from gemma4_eqx.assets import TINY_CHECKPOINT

INDEX = "model.safetensors.index.json"


@pytest.fixture()
def sharded(tmp_path):
    folder = tmp_path / "ckpt"
    g4.save(g4.load(TINY_CHECKPOINT), folder, max_shard_size="500KB")
    return folder


def _edit_index(folder, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index)
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../foreign.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "",
                                  "model.safetensors\x00x", "..\\foreign.safetensors", "foreign.bin", 5, None])
def test_a_shard_name_that_is_not_a_plain_file_in_the_folder_is_refused(sharded, name):
    _edit_index(sharded, lambda ix: ix["weight_map"].__setitem__(next(iter(ix["weight_map"])), name))
    with pytest.raises(g4.CheckpointError, match=r"model\.safetensors\.index\.json: weight_map\[.*\]: expected a "
                                                 r"plain file name inside the checkpoint folder"):
        g4.load(sharded)


def test_a_foreign_file_is_never_opened_and_its_bytes_never_shown(sharded):
    foreign = sharded.parent / "foreign.safetensors"
    foreign.write_bytes(b"SECRET!!" + b"x" * 100)
    number = str(struct.unpack("<Q", b"SECRET!!")[0])
    _edit_index(sharded, lambda ix: ix["weight_map"].update({k: "../foreign.safetensors" for k in ix["weight_map"]}))
    with pytest.raises(g4.CheckpointError) as info:
        g4.load(sharded)
    assert number not in str(info.value) and "SECRET" not in str(info.value)


def test_a_bad_safetensors_header_length_does_not_show_the_bytes(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(TINY_CHECKPOINT, folder)
    (folder / "model.safetensors").write_bytes(b"PRIVATE1" + b"\x00" * 64)
    with pytest.raises(g4.CheckpointError, match="model.safetensors: cannot be read as safetensors") as info:
        g4.load(folder)
    assert str(struct.unpack("<Q", b"PRIVATE1")[0]) not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('{"metadata": {}}', "the field 'weight_map' is missing"),
    ('{"weight_map": []}', "weight_map: expected a non-empty object"),
    ('{"weight_map": {}}', "weight_map: expected a non-empty object"),
    ('[1]', "expected a JSON object with a 'weight_map'"),
    ('{"weight_map": ', "not valid JSON"),
    ('\xff', "not valid JSON"),
])
def test_a_broken_index_names_the_file_and_the_field(sharded, text, message):
    (sharded / INDEX).write_bytes(text.encode("latin-1"))
    with pytest.raises(g4.CheckpointError, match=rf"{INDEX}: {message}"):
        g4.load(sharded)


def test_a_config_json_without_rope_theta_names_the_file_and_the_field(tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(TINY_CHECKPOINT, folder)
    d = json.loads((folder / "config.json").read_text())
    del d["text_config"]["rope_parameters"]["full_attention"]["rope_theta"]
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(g4.ConfigError, match=r"config\.json: text_config\.rope_parameters\.full_attention\."
                                             r"rope_theta: missing"):
        g4.load(folder)


def test_a_broken_config_json_names_the_file(tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(TINY_CHECKPOINT, folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(g4.ConfigError, match=r"config\.json: not valid JSON"):
        g4.load(folder)


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", jnp.bool_, "uint16"])
def test_an_integer_dtype_is_refused_rather_than_truncating_the_weights(dtype):
    with pytest.raises(ValueError, match="dtype: expected a floating dtype"):
        g4.load(TINY_CHECKPOINT, dtype=dtype)


def test_a_partial_file_left_in_the_folder_is_named_on_load(tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(TINY_CHECKPOINT, folder)
    (folder / "model.safetensors.partial").write_bytes(b"half")
    with pytest.warns(UserWarning, match=r"leftovers of an interrupted or running save .*model\.safetensors\.partial"):
        g4.load(folder)


def test_save_refuses_a_bad_shard_size_before_writing_anything(tmp_path):
    model = g4.load(TINY_CHECKPOINT)
    for size in ("lots", "-5GB", "0", "nanGB", 0):
        with pytest.raises(ValueError, match="max_shard_size: expected a positive size"):
            g4.save(model, tmp_path / "out", max_shard_size=size)
    assert not list(tmp_path.iterdir())


def test_float64_without_x64_is_refused_rather_than_silently_float32():
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on here")
    with pytest.raises(ValueError, match="dtype: float64 needs jax_enable_x64"):
        g4.load(TINY_CHECKPOINT, dtype=jnp.float64)


def test_a_foreign_quantization_config_is_named(tmp_path):
    """A config.json carrying another library's `quantization_config` (e.g. bitsandbytes) is refused by name."""
    folder = tmp_path / "c"
    shutil.copytree(TINY_CHECKPOINT, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(g4.ConfigError, match=r"config\.json: quantization_config: expected an object with quant_method"):
        g4.load(folder)
