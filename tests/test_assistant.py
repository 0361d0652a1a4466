"""The Gemma 4 assistant (MTP drafter) against transformers' `Gemma4UnifiedAssistantForCausalLM`.

References: `scripts/record_hf_assistant.py` (two random drafters, ordered and plain embeddings, over the recorded
`tiny_a` target; fp32, eager attention).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.config import AssistantConfig
from gemma4_eqx.io.assistant import load_assistant, save_assistant
from gemma4_eqx.model.cache import KVCache
from gemma4_eqx.model.decode import forward_with_cache
from gemma4_eqx.io.safetensors import SafetensorsFile

DRAFTERS = ("ordered", "plain")
CASES = ("short", "window", "long", "padded")


@pytest.fixture(scope="module")
def target(fixtures_dir):
    return g4.load(fixtures_dir / "hf" / "tiny_a" / "checkpoint")


@pytest.fixture(scope="module", params=DRAFTERS)
def drafter(request, fixtures_dir):
    folder = fixtures_dir / "hf_assistant" / request.param / "checkpoint"
    return request.param, folder, load_assistant(folder), np.load(fixtures_dir / "hf_assistant" / request.param
                                                                  / "cases.npz")


@jax.jit
def _prefill(target, ids, positions, mask):
    cache = KVCache.init(target.config, max_len=32, dtype=jnp.float32, spare=4)
    h, cache = forward_with_cache(target, ids, cache, positions=positions, attention_mask=mask)
    return h[-1], target.logits_from_hidden(h[-1]), cache


@jax.jit
def _draft(drafter, target, cache, token, hidden):
    return drafter.draft(target, cache, token, hidden, 3)


def test_config_reads_the_recorded_drafters(drafter):
    name, folder, model, _ = drafter
    cfg = model.config
    assert cfg.use_ordered_embeddings == (name == "ordered")
    assert cfg.text.layer_types == ("sliding_attention",) * 3 + ("full_attention",)
    assert cfg.backbone_hidden_size == 64
    raw = json.loads((folder / "config.json").read_text())
    again = AssistantConfig.from_hf_dict({**cfg.to_hf_dict(), "dtype": "float32"})
    assert again == cfg and raw["text_config"]["use_double_wide_mlp"] == cfg.use_double_wide_mlp


def test_logits_equal_transformers(drafter, target):
    """Each case: the target prefills the prompt, the drafter drafts 3 tokens greedily from the target's first
    token; every step's logits within 1e-4 of transformers' (fp32), same draft tokens."""
    name, _, model, ref = drafter
    model.check_target(target)
    worst = 0.0
    for case in CASES:
        ids, am = ref[f"{case}/input_ids"], ref[f"{case}/attention_mask"]
        pos = np.where(am, np.cumsum(am) - 1, 0).astype(np.int32)
        hidden, logits, cache = _prefill(target, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(am))
        first = int(jnp.argmax(logits))
        assert first == int(ref[f"{case}/first_token"])
        assert int(cache.next_position) == int(ref[f"{case}/position"])
        tokens, draft_logits = _draft(model, target, cache, jnp.int32(first), hidden)
        np.testing.assert_array_equal(np.asarray(tokens), ref[f"{case}/draft_tokens"])
        err = float(np.abs(np.asarray(draft_logits) - ref[f"{case}/logits"]).max())
        worst = max(worst, err)
        assert err < 1e-4, (name, case, err)
    assert worst > 0.0  # computed independently, not copied


def test_save_round_trip_is_bit_exact(drafter, tmp_path):
    name, folder, model, _ = drafter
    out = tmp_path / name
    save_assistant(model, out)
    theirs, ours = SafetensorsFile(str(folder / "model.safetensors")), SafetensorsFile(str(out / "model.safetensors"))
    assert sorted(theirs.keys()) == sorted(ours.keys())
    for k in theirs.keys():
        assert theirs.dtype_name(k) == ours.dtype_name(k), k
        assert theirs.read(k).tobytes() == ours.read(k).tobytes(), k
    again = load_assistant(out)
    assert again.config == model.config


def _copy(folder, tmp_path):
    dst = tmp_path / "drafter"
    shutil.copytree(folder, dst)
    return dst


def test_load_errors_name_the_tensor_or_field(fixtures_dir, tmp_path):
    folder = fixtures_dir / "hf_assistant" / "ordered" / "checkpoint"
    dst = _copy(folder, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    bad = {**cfg, "num_centroid": 16}
    (dst / "config.json").write_text(json.dumps(bad))
    with pytest.raises(g4.ConfigError, match="num_centroid"):
        load_assistant(dst)
    bad = {**cfg, "text_config": {**cfg["text_config"], "num_kv_shared_layers": 2}}
    (dst / "config.json").write_text(json.dumps(bad))
    with pytest.raises(g4.ConfigError, match="num_kv_shared_layers"):
        load_assistant(dst)
    bad = {**cfg, "num_centroids": 24}
    (dst / "config.json").write_text(json.dumps(bad))
    with pytest.raises(g4.ConfigError, match="num_centroids"):
        load_assistant(dst)
    # the config says plain embeddings: the centroid tensors are then unexpected, and named
    (dst / "config.json").write_text(json.dumps({**cfg, "use_ordered_embeddings": False}))
    with pytest.raises(g4.CheckpointError, match="masked_embedding"):
        load_assistant(dst)
    # a wider drafter than the file holds: the first tensor whose shape differs is named
    (dst / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "hidden_size": 48}}))
    with pytest.raises(g4.CheckpointError, match=r"model\.embed_tokens\.weight: expected shape"):
        load_assistant(dst)


def test_geometry_mismatch_with_the_target_is_named(drafter):
    _, _, model, _ = drafter
    other = g4.load(g4.assets.TINY_CHECKPOINT)
    with pytest.raises(ValueError, match="backbone_hidden_size|vocab_size"):
        model.check_target(other)
