"""The command line on the bundled checkpoint (no network)."""

import json

import numpy as np
from safetensors.numpy import load_file

from gemma4_eqx import cli
from gemma4_eqx.assets import TINY_CHECKPOINT


def test_info_reports_the_12b_counts_from_a_config_file(fixtures_dir, capsys):
    assert cli.main(["info", "--model", str(fixtures_dir / "configs" / "gemma-4-12B.per_layer_config.json"),
                     "--json", "--context", "262144"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters (total)"] == "11,959,730,224"
    assert info["parameters (text)"] == "11,907,350,320"
    # raw keys stored once for the 8 global layers; storing K and V is the 4.3 GiB the issue estimated
    assert info["KV cache at 262,144 tokens (batch 1, bfloat16)"] == "2.314 GiB (raw keys; 4.314 GiB with K and V)"


def test_info_defaults_to_the_bundled_checkpoint(capsys):
    assert cli.main(["info"]) == 0
    assert str(TINY_CHECKPOINT) in capsys.readouterr().out


def test_generate_streams_greedy_text(capsys):
    args = ["generate", "--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0", "--show-special"]
    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert cli.main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.strip()
    assert "6 tokens" in first.err


def test_convert_to_bfloat16(tmp_path):
    assert cli.main(["convert", "--out", str(tmp_path), "--dtype", "bfloat16"]) == 0
    converted = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(TINY_CHECKPOINT / "model.safetensors"))
    assert converted.keys() == original.keys()
    assert {t.dtype.name for t in converted.values()} == {"bfloat16"}
    name = "model.language_model.embed_tokens.weight"
    np.testing.assert_allclose(converted[name].astype(np.float32), original[name], rtol=1e-2, atol=1e-2)


def test_verify_compares_equinox_nnx_and_transformers_on_the_bundled_checkpoint(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "image" in out and "text" in out and out.strip().endswith("(fp32 logits, valid positions)")
    assert "OK:" in out


def test_verify_fails_loudly_on_a_tight_tolerance(capsys):
    assert cli.main(["verify", "--tolerance", "1e-12"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
