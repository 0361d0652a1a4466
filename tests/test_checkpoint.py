"""Checkpoint I/O: bit-exact round trips and clear errors for every kind of bad file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemma4_eqx as g4

Q5 = "model.language_model.layers.5.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = g4.Gemma4(g4.small_config(), key=jax.random.key(1))
    folder = tmp_path_factory.mktemp("ckpt")
    g4.save(model, folder)
    return model, folder


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _rewrite(src, dst, change):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = _tensors(src)
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_save_writes_hf_names_and_layout(saved):
    model, folder = saved
    tensors = _tensors(folder)
    assert tensors[Q5].shape == (4 * 32, 64)  # [out, in] on disk
    np.testing.assert_array_equal(tensors[Q5].T, np.asarray(model.layers.layer(5).self_attn.q_proj.weight))
    assert "model.language_model.layers.5.self_attn.v_proj.weight" not in tensors
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma4_unified"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_of_load_is_bit_exact(saved, tmp_path, dtype):
    _, folder = saved
    src = folder
    if dtype == jnp.bfloat16:  # make a bf16 checkpoint first, then round-trip it
        g4.save(g4.load(folder, dtype=jnp.bfloat16), tmp_path / "bf16")
        src = tmp_path / "bf16"
    g4.save(g4.load(src), tmp_path / "again")
    a, b = _tensors(src), _tensors(tmp_path / "again")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_sharded_checkpoint_round_trips(saved, tmp_path):
    model, _ = saved
    g4.save(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    again = g4.load(tmp_path)
    for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_honours_dtype(saved):
    _, folder = saved
    model = g4.load(folder, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model)} == {jnp.dtype(jnp.bfloat16)}


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.pop(Q5))
    with pytest.raises(g4.CheckpointError, match=f"{Q5}: missing"):
        g4.load(bad)


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, folder = saved
    name = "model.language_model.layers.5.self_attn.v_proj.weight"
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    with pytest.raises(g4.CheckpointError, match=f"{name}: unexpected tensor"):
        g4.load(bad)


def test_wrong_shape_says_expected_and_found(saved, tmp_path):
    _, folder = saved
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.__setitem__(Q5, np.zeros((64, 64), np.float32)))
    with pytest.raises(g4.CheckpointError, match=rf"{Q5}: expected shape \(128, 64\), found \(64, 64\)"):
        g4.load(bad)


def test_wrong_dtype_is_named(saved, tmp_path):
    _, folder = saved
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.__setitem__(Q5, np.zeros((128, 64), np.int32)))
    with pytest.raises(g4.CheckpointError, match=f"{Q5}: expected a floating dtype.*found I32"):
        g4.load(bad)


def test_mixed_precision_needs_an_explicit_dtype(saved, tmp_path):
    _, folder = saved
    bad = _rewrite(folder, tmp_path / "bad", lambda t: t.__setitem__(Q5, t[Q5].astype(np.float16)))
    with pytest.raises(g4.CheckpointError, match=f"{Q5}: expected F32 .* found F16; pass dtype="):
        g4.load(bad)
    assert g4.load(bad, dtype=jnp.float32).dtype == jnp.float32


def test_truncated_file_fails_clearly(saved, tmp_path):
    _, folder = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(g4.CheckpointError, match="model.safetensors: cannot be read as safetensors"):
        g4.load(bad)


def test_pickle_checkpoints_are_refused(tmp_path):
    g4.small_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="pickled .bin files are refused"):
        g4.load(tmp_path)


def test_transformers_in_memory_vision_names_are_accepted(saved, tmp_path):
    model, folder = saved

    def rename(t):
        for name in [n for n in t if n.startswith("model.vision_embedder.")]:
            t["model.embed_vision." + name[len("model.vision_embedder."):]] = t.pop(name)

    renamed = _rewrite(folder, tmp_path / "renamed", rename)
    again = g4.load(renamed)
    np.testing.assert_array_equal(np.asarray(again.embed_vision.pos_embedding),
                                  np.asarray(model.embed_vision.pos_embedding))


# ---- complete folders ----------------------------------------------------------------------------------------
class _FakeProcessor:
    """Stands in for g4.Processor.save_pretrained: writes the files a processor folder holds."""

    FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}",
             "processor_config.json": "{}"}

    def save_pretrained(self, folder) -> None:
        for name, text in self.FILES.items():
            with open(f"{folder}/{name}", "w") as f:
                f.write(text)


def test_save_writes_a_complete_folder_with_the_processor(saved, tmp_path):
    model, _ = saved
    g4.save(model, tmp_path / "out", processor=_FakeProcessor())
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json", *_FakeProcessor.FILES}
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    cfg = model.config
    assert generation["eos_token_id"] == list(cfg.eos_token_id or cfg.text.eos_token_id)
    assert generation["suppress_tokens"] == [cfg.eoa_token_id, cfg.eoi_token_id]


def test_save_writes_the_generation_config_given_and_keeps_the_folders_own_otherwise(saved, tmp_path):
    model, _ = saved
    g4.save(model, tmp_path, generation_config={"eos_token_id": [1, 7], "do_sample": False})
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": [1, 7],
                                                                             "do_sample": False}
    g4.save(model, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [1, 7]


def test_save_refuses_a_processor_it_cannot_write(saved, tmp_path):
    model, _ = saved
    with pytest.raises(TypeError, match="processor: expected an object with save_pretrained"):
        g4.save(model, tmp_path / "out", processor=object())
    assert not (tmp_path / "out").exists()
