"""Gemma4Config: reading real config.json files, writing them back, rejecting impossible values."""

import copy
import json

import pytest

import gemma4_eqx as g4
from gemma4_eqx.config import FULL, SLIDING

SPELLINGS = ["gemma-4-12B.global_head_dim.json", "gemma-4-12B.per_layer_config.json"]


def _read(fixtures_dir, name):
    return json.loads((fixtures_dir / "configs" / name).read_text())


@pytest.mark.parametrize("name", SPELLINGS)
def test_real_config_reads_to_the_12b_preset(fixtures_dir, name):
    cfg = g4.Gemma4Config.from_pretrained(fixtures_dir / "configs" / name)
    assert cfg == g4.Gemma4Config.gemma4_12b()


def test_preset_holds_the_real_values():
    cfg = g4.Gemma4Config.gemma4_12b()
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (3840, 15360, 48)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (16, 8, 256)
    assert (t.global_head_dim, t.num_global_key_value_heads, t.attention_k_eq_v) == (512, 1, True)
    assert [i for i, lt in enumerate(t.layer_types) if lt == FULL] == [5, 11, 17, 23, 29, 35, 41, 47]
    assert t.sliding_window == 1024 and t.final_logit_softcapping == 30.0 and t.vocab_size == 262144
    assert t.rope_full.rope_type == "proportional" and t.rope_full.partial_rotary_factor == 0.25
    assert t.rope_full.rope_theta == 1e6 and t.rope_sliding.rope_theta == 1e4
    full = t.layer_geometry(5)
    assert (full.head_dim, full.num_key_value_heads, full.has_v_proj) == (512, 1, False)
    sliding = t.layer_geometry(0)
    assert (sliding.head_dim, sliding.num_key_value_heads, sliding.has_v_proj) == (256, 8, True)
    assert cfg.vision.patch_dim == 6912 and cfg.vision.mm_posemb_size == 1120
    assert cfg.audio.audio_embed_dim == 640
    assert (cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id) == (258880, 258881, 258884)
    assert (cfg.boi_token_id, cfg.eoi_token_id, cfg.boa_token_id, cfg.eoa_token_id) == (255999, 258882, 256000, 258883)


def test_to_hf_dict_round_trips():
    cfg = g4.Gemma4Config.gemma4_12b()
    d = cfg.to_hf_dict()
    assert d["eoa_token_index"] == 258883 and "eoa_token_id" not in d
    assert d["text_config"]["per_layer_config"]["05"] == {"head_dim": 512, "num_key_value_heads": 1}
    assert g4.Gemma4Config.from_hf_dict(json.loads(json.dumps(d))) == cfg
    small = g4.small_config()
    assert g4.Gemma4Config.from_hf_dict(small.to_hf_dict()) == small


def test_unknown_model_type_is_rejected(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[0])
    d["model_type"] = "gemma3"
    with pytest.raises(g4.ConfigError, match="model_type.*gemma3"):
        g4.Gemma4Config.from_hf_dict(d)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_key_value_heads", 3, r"text_config.num_key_value_heads: 3 does not divide num_attention_heads=16"),
        ("num_hidden_layers", 47, r"text_config.layer_types: has 48 entries but num_hidden_layers is 47"),
        ("hidden_size", 0, r"text_config.hidden_size: expected a positive integer"),
        ("num_global_key_value_heads", 5, r"text_config.num_global_key_value_heads: 5 does not divide"),
        ("use_bidirectional_attention", "all", r"text_config.use_bidirectional_attention"),
    ],
)
def test_inconsistent_text_values_name_the_field(fixtures_dir, field, value, message):
    d = _read(fixtures_dir, SPELLINGS[0])
    d["text_config"][field] = value
    with pytest.raises(g4.ConfigError, match=message):
        g4.Gemma4Config.from_hf_dict(d)


def test_bad_layer_type_names_its_index(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[0])
    d["text_config"]["layer_types"][3] = "chunked_attention"
    with pytest.raises(g4.ConfigError, match=r"layer_types\[3\]"):
        g4.Gemma4Config.from_hf_dict(d)


def test_per_layer_config_on_a_sliding_layer_is_rejected(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[1])
    d["text_config"]["per_layer_config"]["04"] = {"head_dim": 512, "num_key_value_heads": 1}
    with pytest.raises(g4.ConfigError, match=r"per_layer_config\['04'\].*sliding_attention"):
        g4.Gemma4Config.from_hf_dict(d)


def test_special_id_outside_vocab_is_rejected(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[0])
    d["eoa_token_index"] = 300000
    with pytest.raises(g4.ConfigError, match="eoa_token_index: 300000 is outside the vocabulary"):
        g4.Gemma4Config.from_hf_dict(d)


def test_vision_dims_must_agree(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[0])
    d["vision_config"]["output_proj_dims"] = 1024
    with pytest.raises(g4.ConfigError, match="vision_config.output_proj_dims"):
        g4.Gemma4Config.from_hf_dict(d)


def test_missing_layer_types_follow_the_transformers_rule(fixtures_dir):
    d = _read(fixtures_dir, SPELLINGS[0])
    del d["text_config"]["layer_types"]
    cfg = g4.Gemma4Config.from_hf_dict(d)
    assert cfg.text.layer_types == g4.Gemma4Config.gemma4_12b().text.layer_types
    assert cfg.text.layer_types[-1] == FULL and cfg.text.layer_types[0] == SLIDING


def test_optional_modalities():
    d = copy.deepcopy(g4.small_config().to_hf_dict())
    d["vision_config"] = None
    del d["audio_config"]
    cfg = g4.Gemma4Config.from_hf_dict(d)
    assert cfg.vision is None and cfg.audio is None
