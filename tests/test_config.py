"""Gemma4Config: reading real config.json files, writing them back, rejecting impossible values."""

import copy
import json
import pathlib

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


# ---- strict reading: typed, ranged, no silent default -------------------------------------------------------
import math  # noqa: E402

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from gemma4_eqx.assets import TINY_CHECKPOINT  # noqa: E402


def _tiny() -> dict:
    return json.loads((TINY_CHECKPOINT / "config.json").read_text())


@pytest.mark.parametrize("key", ["sliding_window", "final_logit_softcapping", "rms_norm_eps", "hidden_size",
                                 "num_key_value_heads", "attention_k_eq_v", "rope_parameters",
                                 "use_bidirectional_attention", "vocab_size"])
def test_a_field_the_real_config_always_carries_is_never_defaulted(key):
    d = _tiny()
    del d["text_config"][key]
    with pytest.raises(g4.ConfigError, match=rf"text_config\.{key}: missing; expected"):
        g4.Gemma4Config.from_hf_dict(d)


@pytest.mark.parametrize("key, value, found", [
    ("attention_k_eq_v", "false", "'false'"),  # a string would read as True
    ("sliding_window", 16.9, "16.9"),  # would be truncated to 16
    ("sliding_window", 16.0, "16.0"),
    ("rms_norm_eps", -1e-6, "-1e-06"),  # would give NaN
    ("rms_norm_eps", float("nan"), "nan"),
    ("final_logit_softcapping", float("inf"), "inf"),
    ("hidden_size", True, "True"),
    ("num_hidden_layers", 10**30, str(10**30)),
    ("tie_word_embeddings", 1, "1"),
])
def test_a_mistyped_or_out_of_range_field_names_field_value_and_expectation(key, value, found):
    d = _tiny()
    d["text_config"][key] = value
    with pytest.raises(g4.ConfigError, match=rf"text_config\.{key}: expected .*, found {found}"):
        g4.Gemma4Config.from_hf_dict(d)


def test_the_proportional_rope_fraction_and_thetas_are_never_assumed():
    d = _tiny()
    del d["text_config"]["rope_parameters"]["full_attention"]["partial_rotary_factor"]
    with pytest.raises(g4.ConfigError, match=r"rope_parameters\.full_attention\.partial_rotary_factor: missing"):
        g4.Gemma4Config.from_hf_dict(d)
    d = _tiny()
    del d["text_config"]["rope_parameters"]["sliding_attention"]["rope_theta"]
    with pytest.raises(g4.ConfigError, match=r"rope_parameters\.sliding_attention\.rope_theta: missing"):
        g4.Gemma4Config.from_hf_dict(d)


def test_the_full_layer_geometry_must_come_from_one_spelling_or_the_other():
    d = _tiny()
    for key in ("per_layer_config", "global_head_dim"):
        del d["text_config"][key]
    with pytest.raises(g4.ConfigError, match=r"text_config\.global_head_dim: missing"):
        g4.Gemma4Config.from_hf_dict(d)


def test_null_soft_cap_is_read_as_no_soft_cap():
    d = _tiny()
    d["text_config"]["final_logit_softcapping"] = None
    assert g4.Gemma4Config.from_hf_dict(d).text.final_logit_softcapping is None


def test_absent_optional_fields_take_the_dataclass_defaults():
    d = _tiny()
    for key in ("initializer_range", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
                "hidden_activation", "tie_word_embeddings", "layer_types"):
        d["text_config"].pop(key)
    del d["vision_config"]["output_proj_dims"]
    text = g4.Gemma4Config.from_hf_dict(d).text
    default = g4.TextConfig()
    for key in ("initializer_range", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
                "hidden_activation", "tie_word_embeddings"):
        assert getattr(text, key) == getattr(default, key), key


def test_an_unreadable_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma4_unified", ')
    with pytest.raises(g4.ConfigError, match=rf"{tmp_path / 'config.json'}: not valid JSON"):
        g4.Gemma4Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(g4.ConfigError, match="config.json: not valid JSON"):
        g4.Gemma4Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(g4.ConfigError, match="config.json: config: expected a JSON object"):
        g4.Gemma4Config.from_pretrained(tmp_path)


def test_a_bad_field_read_from_a_file_names_the_file_and_the_field(tmp_path):
    d = _tiny()
    d["text_config"]["sliding_window"] = "1024"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(g4.ConfigError, match=r"config\.json: text_config\.sliding_window: expected a positive "
                                             r"integer, found '1024'"):
        g4.Gemma4Config.from_pretrained(tmp_path)


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON tree, containers included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_BASES = {"tiny": _tiny(), "12b": json.loads((pathlib.Path(__file__).parent / "fixtures" / "configs" /
                                             "gemma-4-12B.per_layer_config.json").read_text())}
_PATHS = {name: [p for p, _ in _paths(base) if p] for name, base in _BASES.items()}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, 16.9, 1e-6, -1e-6, 1.0, 2, 0])
    | st.sampled_from(["", "false", "true", "16", "vision", "all", "full_attention", "default", "proportional"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def _mutated(draw):
    name = draw(st.sampled_from(sorted(_BASES)))
    d = copy.deepcopy(_BASES[name])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_PATHS[name]))
        parent = d
        try:
            for key in path[:-1]:
                parent = parent[key]
            if not isinstance(parent, (dict, list)) or (isinstance(parent, list) and path[-1] >= len(parent)):
                continue
            if isinstance(parent, dict) and path[-1] not in parent:
                continue
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_JSON)
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_random_configs_give_a_valid_config_or_a_config_error(tmp_path_factory, d):
    folder = tmp_path_factory.mktemp("cfg", numbered=True)
    (folder / "config.json").write_text(json.dumps(d))  # NaN and Infinity written as JSON's extensions
    try:
        cfg = g4.Gemma4Config.from_pretrained(folder)
    except g4.ConfigError as e:
        assert str(e).startswith(str(folder / "config.json") + ": ")
        return
    # a config that reads is a consistent one: it writes back and reads again to itself
    assert g4.Gemma4Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    t = cfg.text
    assert all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in
               (t.hidden_size, t.sliding_window, t.head_dim, t.global_head_dim, t.num_hidden_layers))
    assert math.isfinite(t.rms_norm_eps) and t.rms_norm_eps > 0
    assert t.final_logit_softcapping is None or (math.isfinite(t.final_logit_softcapping)
                                                 and t.final_logit_softcapping > 0)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_as_config_json_give_a_config_error(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("raw", numbered=True)
    (folder / "config.json").write_bytes(raw)
    with pytest.raises(g4.ConfigError, match="config.json: "):
        g4.Gemma4Config.from_pretrained(folder)


@pytest.mark.parametrize("field, value, message", [
    ("eos_token_id", 3.7, r"eos_token_id: expected a token id or a list of token ids"),
    ("eos_token_id", True, r"eos_token_id: expected a token id"),
    ("suppress_tokens", ["x"], r"suppress_tokens: expected a token id"),
    ("pad_token_id", -1, r"pad_token_id: expected a non-negative integer or null"),
    ("top_k", 1.5, r"top_k: expected a non-negative integer"),
    ("top_p", 2, r"top_p: expected a finite number > 0 and <= 1.0"),
    ("temperature", "hot", r"temperature: expected a finite number >= 0"),
    ("do_sample", "no", r"do_sample: expected true or false"),
])
def test_generation_config_fields_are_read_strictly(tmp_path, field, value, message):
    """generation_config.json's ids and sampling fields keep their types: 3.7 is not rounded to 3, true is not 1."""
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(g4.ConfigError, match=r"generation_config\.json: generation_config\." + message):
        g4.GenerationConfig.from_pretrained(tmp_path)
