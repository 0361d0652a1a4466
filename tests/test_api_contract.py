"""The public contract (`API.md`, shared beside the repository: `../shared/API.md`), call by call, on the checkpoint bundled in the package, with no network.

Each test makes one call of API.md exactly as it is written there (names, keyword names, argument order,
shapes) and checks the documented return type, shape, dtype or behaviour, so that a caller who follows
API.md never meets a TypeError. Numerical parity is the other modules' job (test_hf_parity, test_bridge,
test_generation, ...); the few value checks here only tie a call to the documented meaning of its output.
A call that does not work as written stays here, marked `xfail(strict=True)` with the discrepancy.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tokenizers
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import gemma4_eqx as g4
import gemma4_eqx.bridge  # noqa: F401
import gemma4_eqx.model.sharding  # noqa: F401
from gemma4_eqx import cli
from gemma4_eqx import nnx as g4nnx
from gemma4_eqx.assets import TINY_CHECKPOINT

REPO = pathlib.Path(__file__).resolve().parents[1]
MEDIA_KEYS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids", "input_features",
              "input_features_mask")
PROCESSOR_OUTPUTS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
                     "pixel_values_videos", "video_position_ids", "num_frames_per_video", "input_features",
                     "input_features_mask"}
# API.md's literal generation settings (the real 12B's special ids; out-of-vocabulary ids are ignored here)
STOP_IDS, SUPPRESS_IDS = (1, 106, 50), (258882, 258883)


# ---- small seeded inputs ---------------------------------------------------------------------------------
def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _video(frames: int = 32) -> np.ndarray:
    # 32 frames: the bundled video processor samples num_frames=32 by default
    return np.random.default_rng(1).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)


def _waveform(frames: int = 5, seed: int = 2) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(640 * frames)).astype(np.float32)


def _text_ids(seq: int, seed: int = 3) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(3, 1000, seq), jnp.int32)


def _softcap(h, model):
    cap = model.config.text.final_logit_softcapping
    return jnp.tanh(h @ model.embed_tokens.T / cap) * cap


# Baselines the checks compare against, jitted so that one compilation serves every test (same model
# structure and shapes); the calls under test themselves are made as API.md writes them.
# jit keys its cache on whether each input array is committed to a device, as well as on shapes: a loaded model's
# arrays are, a bridged model's are not; an id computed on the device is, a literal is not. So the models go in
# committed (device_put is a no-op for a loaded one) and the ids as numpy arrays, and no program is compiled twice.
_logits_program = eqx.filter_jit(lambda m, ids: m(ids))
_batched_logits_program = eqx.filter_jit(lambda m, ids: jax.vmap(m)(ids))
_nnx_logits_program = nnx.jit(lambda r, ids: r.logits(ids))  # eagerly, every NNX operation compiles alone


def _committed(model):
    return jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]) if isinstance(x, jax.Array) else x, model)


def _logits(m, ids):
    return _logits_program(_committed(m), np.asarray(ids))


def _batched_logits(m, ids):
    return _batched_logits_program(_committed(m), np.asarray(ids))


def _nnx_logits(r, ids):
    return _nnx_logits_program(_committed(r), np.asarray(ids))


GREEDY = dict(key=jax.random.key(0), temperature=0.0, stop_ids=(), suppress_ids=())
# a 5-token prompt, and a batch of it left-padded to 8 beside an 8-token prompt
SHORT, LONG = _text_ids(5, seed=8), _text_ids(8, seed=9)
LEFT_PADDED = jnp.stack([jnp.concatenate([jnp.zeros(3, jnp.int32), SHORT]), LONG])
LEFT_PADDED_MASK = jnp.stack([jnp.arange(8) >= 3, jnp.ones(8, bool)])


# ---- shared objects (one load each) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg() -> g4.Gemma4Config:
    return g4.Gemma4Config.from_pretrained(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def model() -> g4.Gemma4:
    return g4.load(TINY_CHECKPOINT, dtype=jnp.float32)


@pytest.fixture(scope="module")
def ref() -> g4nnx.Gemma4NNX:
    return g4nnx.load(TINY_CHECKPOINT, dtype=jnp.float32)


@pytest.fixture(scope="module")
def proc() -> g4.Processor:
    return g4.Processor.from_pretrained(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def sample(proc) -> dict[str, np.ndarray]:
    """One sequence with an image, a 2-frame video and an audio clip, in the Equinox model's per-sequence form."""
    batch = proc(text=["<|image|> look <|video|> and <|audio|>"], images=[[_image()]], videos=[_video()],
                 video_metadata=[{"total_num_frames": 32, "fps": 10.0}], audio=[_waveform()],
                 images_kwargs={"max_soft_tokens": 70}, videos_kwargs={"num_frames": 2})
    out = {k: np.asarray(batch[k])[0] for k in ("input_ids", "mm_token_type_ids")}
    out["attention_mask"] = np.asarray(batch["attention_mask"])[0].astype(bool)
    out.update({k: np.asarray(batch[k]) for k in MEDIA_KEYS})
    return out


@pytest.fixture(scope="module")
def nnx_batch(proc) -> dict[str, np.ndarray]:
    """Two left-padded rows, an image in each, a video in the first and audio in the second, media stacked
    over the batch as transformers does."""
    batch = proc(text=["<|image|> one <|video|>", "two <|image|> and <|audio|>"], images=[[_image(0)], [_image(1)]],
                 videos=[_video()], video_metadata=[{"total_num_frames": 32, "fps": 10.0}], audio=[_waveform()],
                 images_kwargs={"max_soft_tokens": 70}, videos_kwargs={"num_frames": 2})
    out = {k: np.asarray(v) for k, v in batch.items()}
    mask = out["attention_mask"].astype(bool)
    out["positions"] = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    return out


# ---- Config ----------------------------------------------------------------------------------------------
def test_config_from_pretrained_reads_the_bundled_folder_and_its_config_json(cfg):
    assert isinstance(cfg, g4.Gemma4Config)
    assert g4.Gemma4Config.from_pretrained(TINY_CHECKPOINT / "config.json") == cfg
    assert cfg.text.vocab_size == 1024 and cfg.text.hidden_size == 64


def test_config_gemma4_12b_holds_the_real_values():
    cfg = g4.Gemma4Config.gemma4_12b()
    assert isinstance(cfg, g4.Gemma4Config)
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (3840, 48, 262144)
    assert (cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id) == (258880, 258881, 258884)


def test_config_text_vision_audio_are_frozen_dataclasses(cfg):
    for part in (cfg.text, cfg.vision, cfg.audio):
        assert dataclasses.is_dataclass(part)
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.rms_norm_eps = 0.5
    d = cfg.to_hf_dict()
    d["vision_config"], d["audio_config"] = None, None
    text_only = g4.Gemma4Config.from_hf_dict(d)
    assert text_only.vision is None and text_only.audio is None


def test_config_to_hf_dict_is_a_config_json_that_reads_back(cfg, tmp_path):
    d = cfg.to_hf_dict()
    assert d["model_type"] == "gemma4_unified" and d["text_config"]["model_type"] == "gemma4_unified_text"
    assert d["eoa_token_index"] == cfg.eoa_token_id
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert g4.Gemma4Config.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("drop", [("per_layer_config",), ("global_head_dim", "num_global_key_value_heads")])
def test_config_accepts_either_spelling_of_the_full_layer_geometry(cfg, drop):
    d = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    for key in drop:
        del d["text_config"][key]
    assert g4.Gemma4Config.from_hf_dict(d) == cfg


def test_config_reads_eoa_token_index(cfg):
    d = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    assert "eoa_token_index" in d and cfg.eoa_token_id == d["eoa_token_index"]
    d["eoa_token_index"] = 1000
    assert g4.Gemma4Config.from_hf_dict(d).eoa_token_id == 1000


def test_config_rejects_unknown_model_type_and_impossible_values_naming_the_field(cfg):
    d = cfg.to_hf_dict()
    with pytest.raises(ValueError, match="model_type"):
        g4.Gemma4Config.from_hf_dict({**d, "model_type": "gemma3"})
    d["text_config"] = {**d["text_config"], "hidden_size": 0}
    with pytest.raises(ValueError, match="hidden_size"):
        g4.Gemma4Config.from_hf_dict(d)


# ---- The Equinox model -----------------------------------------------------------------------------------
def test_random_init_is_an_equinox_module_of_the_given_dtype(cfg):
    m = g4.Gemma4(cfg, key=jax.random.key(0), dtype=jnp.float32)
    assert isinstance(m, g4.Gemma4) and isinstance(m, eqx.Module)
    assert {x.dtype for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))} == {jnp.dtype(jnp.float32)}


def test_load_casts_to_the_requested_dtype():
    m = g4.load(TINY_CHECKPOINT, dtype=jnp.bfloat16)
    assert isinstance(m, g4.Gemma4)
    assert {x.dtype for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))} == {jnp.dtype(jnp.bfloat16)}


def test_save_writes_hf_names_and_load_reads_it_back_equal(model, tmp_path):
    out_dir = tmp_path / "saved"
    g4.save(model, out_dir)
    assert (out_dir / "config.json").is_file()
    files = sorted(out_dir.glob("*.safetensors"))
    assert files
    from safetensors.numpy import load_file

    names = set().union(*(load_file(str(f)).keys() for f in files))
    assert "model.language_model.embed_tokens.weight" in names
    again = g4.load(out_dir, dtype=jnp.float32)
    assert again.config == model.config
    assert jax.tree.structure(again) == jax.tree.structure(model)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_call_on_one_sequence_gives_soft_capped_logits(model):
    logits = model(_text_ids(12))
    assert logits.shape == (12, model.config.text.vocab_size)
    assert jnp.issubdtype(logits.dtype, jnp.floating)
    assert float(np.max(np.abs(np.asarray(logits)))) <= model.config.text.final_logit_softcapping


@pytest.mark.parametrize("mask_mode", ["intended", "hf_forward"])
def test_call_takes_every_documented_keyword(model, sample, mask_mode):
    seq = sample["input_ids"].shape[0]
    logits = model(
        sample["input_ids"],
        positions=np.arange(seq),
        attention_mask=sample["attention_mask"],
        mm_token_type_ids=sample["mm_token_type_ids"],
        pixel_values=sample["pixel_values"],
        image_position_ids=sample["image_position_ids"],
        pixel_values_videos=sample["pixel_values_videos"],
        video_position_ids=sample["video_position_ids"],
        input_features=sample["input_features"],
        input_features_mask=sample["input_features_mask"],
        mask_mode=mask_mode,
    )
    assert logits.shape == (seq, model.config.text.vocab_size)
    assert jnp.issubdtype(logits.dtype, jnp.floating) and bool(np.all(np.isfinite(np.asarray(logits))))


def test_hidden_states_are_after_the_final_norm(model, sample):
    ids = sample["input_ids"]
    media = {k: sample[k] for k in MEDIA_KEYS}
    h = model.hidden_states(ids, mm_token_type_ids=sample["mm_token_type_ids"], **media)
    assert h.shape == (ids.shape[0], model.config.text.hidden_size) and jnp.issubdtype(h.dtype, jnp.floating)
    logits = model(ids, mm_token_type_ids=sample["mm_token_type_ids"], **media)
    np.testing.assert_allclose(np.asarray(_softcap(h, model)), np.asarray(logits), atol=1e-4, rtol=0)


def test_image_features_shape(model, sample):
    feats = model.image_features(sample["pixel_values"], sample["image_position_ids"])
    images, patches, _ = sample["pixel_values"].shape
    assert feats.shape == (images, patches, model.config.text.hidden_size)
    assert jnp.issubdtype(feats.dtype, jnp.floating)


def test_audio_features_shape(model, sample):
    feats = model.audio_features(sample["input_features"])
    clips, frames, _ = sample["input_features"].shape
    assert feats.shape == (clips, frames, model.config.text.hidden_size)
    assert jnp.issubdtype(feats.dtype, jnp.floating)


def test_batches_go_through_vmap(model):
    ids = jnp.stack([_text_ids(5, seed=s) for s in (4, 5)])
    by_vmap = jax.vmap(model)(ids)
    by_filter_vmap = eqx.filter_vmap(lambda m, x: m(x), in_axes=(None, 0))(model, ids)
    assert by_vmap.shape == by_filter_vmap.shape == (2, 5, model.config.text.vocab_size)
    np.testing.assert_allclose(np.asarray(by_vmap[1]), np.asarray(_logits(model, np.asarray(ids)[1])), atol=1e-4,
                               rtol=0)


def test_modules_are_immutable(model):
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.embed_tokens = model.embed_tokens * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.norm.weight = model.norm.weight


def test_a_batch_axis_on_input_ids_is_rejected(model):
    with pytest.raises((TypeError, ValueError)):
        model(jnp.zeros((2, 6), jnp.int32))


# ---- The NNX reference and the bridge --------------------------------------------------------------------
def test_nnx_random_init(cfg):
    r = g4nnx.Gemma4NNX(cfg, rngs=flax.nnx.Rngs(0))
    assert isinstance(r, g4nnx.Gemma4NNX) and isinstance(r, nnx.Module)


def test_nnx_load_and_logits_on_a_batch_with_token_aligned_kwargs(ref, nnx_batch):
    assert isinstance(ref, g4nnx.Gemma4NNX) and ref.dtype == jnp.float32
    b, s = nnx_batch["input_ids"].shape
    kwargs = {k: nnx_batch[k] for k in ("positions", "attention_mask", "mm_token_type_ids", *MEDIA_KEYS)}
    assert all(kwargs[k].shape == (b, s) for k in ("positions", "attention_mask", "mm_token_type_ids"))
    assert kwargs["pixel_values"].shape[0] == 2  # both rows' images stacked in order
    logits = ref.logits(nnx_batch["input_ids"], **kwargs)
    assert logits.shape == (b, s, ref.config.text.vocab_size) and jnp.issubdtype(logits.dtype, jnp.floating)


def test_nnx_call_gives_hidden_states(ref, nnx_batch):
    ids = nnx_batch["input_ids"]
    h = ref(ids, positions=nnx_batch["positions"], attention_mask=nnx_batch["attention_mask"],
            mm_token_type_ids=nnx_batch["mm_token_type_ids"], pixel_values=nnx_batch["pixel_values"],
            image_position_ids=nnx_batch["image_position_ids"], pixel_values_videos=nnx_batch["pixel_values_videos"],
            video_position_ids=nnx_batch["video_position_ids"], input_features=nnx_batch["input_features"],
            input_features_mask=nnx_batch["input_features_mask"])
    assert h.shape == (*ids.shape, ref.config.text.hidden_size)


def test_nnx_get_image_features(ref, nnx_batch):
    feats = ref.get_image_features(nnx_batch["pixel_values"], nnx_batch["image_position_ids"])
    assert feats.shape == (*nnx_batch["pixel_values"].shape[:2], ref.config.text.hidden_size)


def test_nnx_token_aligned_kwargs_must_be_batch_by_seq(ref):
    ids = jnp.stack([_text_ids(6), _text_ids(6, seed=4)])
    with pytest.raises((TypeError, ValueError), match="positions"):
        ref.logits(ids, positions=jnp.arange(6))


def test_bridge_from_nnx_gives_a_gemma4_with_the_same_logits(ref):
    m = g4.bridge.from_nnx(ref)
    assert isinstance(m, g4.Gemma4)
    ids = jnp.stack([_text_ids(9, seed=s) for s in (6, 7)])
    np.testing.assert_allclose(np.asarray(_batched_logits(m, ids)), np.asarray(_nnx_logits(ref, ids)),
                               atol=1e-4, rtol=0)


def test_bridge_to_nnx_gives_a_gemma4nnx_with_the_same_logits(model):
    r = g4.bridge.to_nnx(model)
    assert isinstance(r, g4nnx.Gemma4NNX)
    ids = jnp.stack([_text_ids(9, seed=s) for s in (6, 7)])
    np.testing.assert_allclose(np.asarray(_nnx_logits(r, ids)), np.asarray(_batched_logits(model, ids)),
                               atol=1e-4, rtol=0)


# ---- Generation ------------------------------------------------------------------------------------------
def test_generate_one_prompt_returns_only_the_new_tokens(model):
    with pytest.warns(UserWarning, match=r"suppress_ids: \[258882, 258883\] lie outside the vocabulary"):
        out = g4.generate(model, _text_ids(7), max_new_tokens=4, key=jax.random.key(0),
                          temperature=1.0, top_k=64, top_p=0.95,
                          stop_ids=STOP_IDS, suppress_ids=SUPPRESS_IDS)
    assert out.shape == (4,) and jnp.issubdtype(out.dtype, jnp.integer)
    assert bool(jnp.all((out >= 0) & (out < model.config.text.vocab_size)))


@pytest.fixture(scope="module")
def greedy_short(model) -> jax.Array:
    return g4.generate(model, SHORT, max_new_tokens=3, **GREEDY)


@pytest.fixture(scope="module")
def greedy_batch(model) -> jax.Array:
    return g4.generate(model, LEFT_PADDED, max_new_tokens=3, attention_mask=LEFT_PADDED_MASK, **GREEDY)


def test_generate_temperature_zero_is_greedy(model, greedy_short):
    first = int(np.argmax(np.asarray(_logits(model, SHORT))[-1]))
    assert int(greedy_short[0]) == first
    assert int(greedy_short[1]) == int(np.argmax(np.asarray(_logits(model, np.append(SHORT, first)))[-1]))


def test_generate_left_padded_batch_with_attention_mask(greedy_batch, greedy_short):
    assert greedy_batch.shape == (2, 3) and jnp.issubdtype(greedy_batch.dtype, jnp.integer)
    # left padding does not change what the padded row generates
    np.testing.assert_array_equal(np.asarray(greedy_batch[0]), np.asarray(greedy_short))


def test_generate_fills_a_row_with_the_pad_id_after_a_stop_id(model, greedy_batch):
    stop = int(greedy_batch[0, 0])
    assert stop not in np.asarray(greedy_batch[1]).tolist(), "choose other prompts: the stop id must end row 0 only"
    out = g4.generate(model, LEFT_PADDED, max_new_tokens=3, attention_mask=LEFT_PADDED_MASK,
                      **{**GREEDY, "stop_ids": (stop,)})
    pad = model.config.text.pad_token_id
    assert int(out[0, 0]) == stop and np.asarray(out[0, 1:]).tolist() == [pad] * 2
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(greedy_batch[1]))


def test_generate_takes_the_multimodal_keywords_of_the_model(model, sample):
    media = {k: sample[k] for k in MEDIA_KEYS}
    out = g4.generate(model, sample["input_ids"], max_new_tokens=2, mm_token_type_ids=sample["mm_token_type_ids"],
                      **media, **GREEDY)
    assert out.shape == (2,)
    # prefill keeps the image blocks' bidirectional mask: the first token is the full forward's argmax
    logits = model(sample["input_ids"], mm_token_type_ids=sample["mm_token_type_ids"], **media)
    assert int(out[0]) == int(jnp.argmax(logits[-1]))


def test_kv_cache_prefill_and_decode_step(model, cfg):
    cache = g4.KVCache.init(cfg, max_len=8, dtype=jnp.float32)
    assert isinstance(cache, g4.KVCache) and isinstance(cache, eqx.Module)
    logits, cache = model.prefill(SHORT, cache)
    assert isinstance(cache, g4.KVCache) and logits.shape == (cfg.text.vocab_size,)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_logits(model, SHORT))[-1], atol=1e-4, rtol=0)
    token = jnp.argmax(logits).astype(jnp.int32)
    logits2, cache2 = model.decode_step(token, cache)
    assert isinstance(cache2, g4.KVCache) and cache2 is not cache and logits2.shape == (cfg.text.vocab_size,)
    assert int(cache2.length) == SHORT.shape[0] + 1
    expected = np.asarray(_logits(model, np.append(SHORT, int(token))))[-1]
    np.testing.assert_allclose(np.asarray(logits2), expected, atol=1e-4, rtol=0)


def test_prefill_takes_the_model_keywords(model, sample, cfg):
    media = {k: sample[k] for k in MEDIA_KEYS}
    cache = g4.KVCache.init(cfg, max_len=sample["input_ids"].shape[0] + 1, dtype=jnp.float32)
    logits, cache = model.prefill(sample["input_ids"], cache, mm_token_type_ids=sample["mm_token_type_ids"],
                                  attention_mask=sample["attention_mask"], **media)
    assert logits.shape == (cfg.text.vocab_size,) and isinstance(cache, g4.KVCache)


# ---- Sharding --------------------------------------------------------------------------------------------
def test_make_mesh_has_axes_fsdp_and_tp():
    mesh = g4.sharding.make_mesh(fsdp=1, tp=1)
    assert isinstance(mesh, Mesh)
    assert tuple(mesh.axis_names) == ("fsdp", "tp") and dict(mesh.shape) == {"fsdp": 1, "tp": 1}
    for one_axis in (g4.sharding.make_mesh(fsdp=1), g4.sharding.make_mesh(tp=1)):
        assert tuple(one_axis.axis_names) == ("fsdp", "tp")


def test_load_on_a_mesh_with_the_default_rules():
    mesh = g4.sharding.make_mesh(fsdp=1, tp=1)
    m = g4.load(TINY_CHECKPOINT, dtype=jnp.bfloat16, mesh=mesh)
    leaves = jax.tree.leaves(eqx.filter(m, eqx.is_array))
    assert all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in leaves)
    assert m.embed_tokens.dtype == jnp.bfloat16
    assert m(_text_ids(6)).shape == (6, m.config.text.vocab_size)


def test_load_on_a_mesh_with_given_rules(model):
    mesh = g4.sharding.make_mesh(fsdp=1, tp=1)
    m = g4.load(TINY_CHECKPOINT, mesh=mesh, rules=g4.sharding.FSDP_TP)
    assert isinstance(m.embed_tokens.sharding, NamedSharding)
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_literal_2x4_mesh_on_8_host_devices():
    """API.md's own example, `make_mesh(fsdp=2, tp=4)`, needs 8 devices: in a subprocess with 8 CPU devices."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        import gemma4_eqx as g4
        from gemma4_eqx.assets import TINY_CHECKPOINT
        mesh = g4.sharding.make_mesh(fsdp=2, tp=4)
        assert isinstance(mesh, jax.sharding.Mesh) and dict(mesh.shape) == {"fsdp": 2, "tp": 4}, mesh
        model = g4.load(TINY_CHECKPOINT, dtype=jnp.bfloat16, mesh=mesh)
        assert model.embed_tokens.dtype == jnp.bfloat16
        assert tuple(model.embed_tokens.sharding.spec) == ("tp", "fsdp"), model.embed_tokens.sharding
        model = g4.load(TINY_CHECKPOINT, mesh=mesh, rules=g4.sharding.FSDP_TP)
        assert len(model.embed_tokens.sharding.device_set) == 8
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---- Input processing ------------------------------------------------------------------------------------
def test_processor_call_returns_the_documented_names(proc):
    batch = proc(text=["<|image|> look <|video|> and <|audio|>", "plain <|image|>"],
                 images=[[_image(0)], [_image(1)]],
                 videos=[_video()],
                 video_metadata=[{"total_num_frames": 32, "fps": 10.0}],
                 audio=[_waveform()],
                 images_kwargs={"max_soft_tokens": 70})
    assert set(batch.keys()) == PROCESSOR_OUTPUTS
    assert all(isinstance(batch[k], np.ndarray) for k in PROCESSOR_OUTPUTS)
    b, s = batch["input_ids"].shape
    assert b == 2 and batch["attention_mask"].shape == batch["mm_token_type_ids"].shape == (b, s)
    assert set(np.unique(batch["mm_token_type_ids"])) == {0, 1, 2, 3}
    assert batch["pixel_values"].shape == (2, 70, 6912) and batch["pixel_values"].dtype == np.float32
    assert batch["image_position_ids"].shape == (2, 70, 2)
    assert batch["num_frames_per_video"].tolist() == [32]
    assert batch["pixel_values_videos"].shape == (32, 70, 6912) and batch["video_position_ids"].shape == (32, 70, 2)
    assert batch["input_features"].shape == (1, 5, 640) and batch["input_features"].dtype == np.float32
    assert batch["input_features_mask"].shape == (1, 5) and batch["input_features_mask"].dtype == bool


def test_processor_takes_pil_images_file_paths_and_uint8_arrays(proc, tmp_path):
    array = _image()
    path = tmp_path / "image.png"
    PIL.Image.fromarray(array).save(path)
    outs = [proc(text=["<|image|>"], images=[[form]], images_kwargs={"max_soft_tokens": 70})
            for form in (array, PIL.Image.fromarray(array), str(path))]
    for out in outs[1:]:
        np.testing.assert_array_equal(out["pixel_values"], outs[0]["pixel_values"])
        np.testing.assert_array_equal(out["input_ids"], outs[0]["input_ids"])


def test_image_processor(proc):
    out = proc.image_processor([_image(0), _image(1)], max_soft_tokens=280)
    assert out["pixel_values"].shape == (2, 280, 6912)
    assert out["image_position_ids"].shape == (2, 280, 2)
    counts = list(out["num_soft_tokens_per_image"])
    assert len(counts) == 2 and all(isinstance(int(n), int) and 0 < n <= 280 for n in counts)


def test_video_processor(proc):
    out = proc.video_processor([_video()], video_metadata=[{"total_num_frames": 32, "fps": 10.0}])
    assert out["pixel_values_videos"].shape == (32, 70, 6912)
    assert out["video_position_ids"].shape == (32, 70, 2)
    assert list(out["num_frames_per_video"]) == [32]


def test_feature_extractor(proc):
    out = proc.feature_extractor([_waveform(3), _waveform(5)], padding="longest", max_length=None, truncation=False)
    assert out["input_features"].shape == (2, 5, 640) and out["input_features"].dtype == np.float32
    assert out["input_features_mask"].shape == (2, 5) and out["input_features_mask"].dtype == bool
    assert out["input_features_mask"].sum(axis=1).tolist() == [3, 5]


def test_tokenizer_is_built_on_the_tokenizers_library(proc):
    tok = proc.tokenizer
    assert isinstance(tok.backend, tokenizers.Tokenizer)
    text = "Hello there"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _conversation(tmp_path):
    path = tmp_path / "image.png"
    PIL.Image.fromarray(_image(1)).save(path)
    return [{"role": "user", "content": [
        {"type": "image", "image": PIL.Image.fromarray(_image(0))},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": _image(2)},
        {"type": "video", "video": _video()},
        {"type": "audio", "audio": _waveform()},
        {"type": "text", "text": "What is shown?"},
    ]}]


def test_apply_chat_template_to_text(proc, tmp_path):
    prompt = proc.apply_chat_template(_conversation(tmp_path), add_generation_prompt=True, tokenize=False,
                                      enable_thinking=False)
    assert isinstance(prompt, str)
    assert prompt.count("<|image|>") == 3 and prompt.count("<|video|>") == 1 and prompt.count("<|audio|>") == 1
    assert "<|turn>model\n" in prompt and "What is shown?" in prompt


@pytest.mark.filterwarnings("ignore:video 0. no fps")
def test_apply_chat_template_tokenized_to_a_dict(proc, tmp_path):
    out = proc.apply_chat_template(_conversation(tmp_path), add_generation_prompt=True, tokenize=True,
                                   return_dict=True)
    assert set(out.keys()) == PROCESSOR_OUTPUTS
    assert out["input_ids"].shape[0] == 1 and out["pixel_values"].shape[0] == 3
    assert out["num_frames_per_video"].tolist() == [32] and out["input_features"].shape[0] == 1


def test_apply_chat_template_passes_spread_processor_kwargs_to_the_processor(proc):
    conv = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    processor_kwargs = {"images_kwargs": {"max_soft_tokens": 70}}
    with pytest.warns(UserWarning, match="prefer processor_kwargs"):
        out = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       **processor_kwargs)
    assert out["pixel_values"].shape == (1, 70, 6912)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="both in processor_kwargs and as keywords"):
        proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 processor_kwargs=processor_kwargs, **processor_kwargs)


def test_apply_chat_template_processor_kwargs_as_one_dict(proc):
    """The spelling the code (and notebooks/01_quickstart.ipynb) uses for the call above."""
    conv = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    out = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   processor_kwargs={"images_kwargs": {"max_soft_tokens": 70}})
    assert out["pixel_values"].shape == (1, 70, 6912)


# ---- Command line ----------------------------------------------------------------------------------------
def test_console_script_and_distribution():
    dist = importlib.metadata.distribution("gemma4-eqx")
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts.get("gemma4-eqx") == "gemma4_eqx.cli:main"
    assert ">=3.12" in (dist.metadata["Requires-Python"] or "").replace(" ", "")
    for name in ("pyproject.toml", "README.md", "gemma4_eqx", "tests", "notebooks", "benchmarks"):
        assert (REPO / name).exists(), name


def test_cli_generate_on_the_bundled_checkpoint_with_an_image_and_audio(tmp_path, capsys):
    import soundfile

    image, audio = tmp_path / "image.png", tmp_path / "audio.wav"
    PIL.Image.fromarray(_image()).save(image)
    soundfile.write(audio, _waveform(), 16000)
    args = ["generate", "--prompt", "Hello", "--image", str(image), "--audio", str(audio), "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "2 tokens" in err
    prompt_tokens = int(re.search(r"prompt (\d+) tokens", err).group(1))
    assert prompt_tokens > 70 + 5  # the image's and the audio clip's soft tokens are in the prompt


# `gemma4-eqx info`, `convert` and `verify` on the bundled checkpoint: tests/test_cli.py.
