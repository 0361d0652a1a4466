"""The command line on the bundled checkpoint (no network)."""

import json

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from gemma4_eqx import cli
from gemma4_eqx.assets import SMALL_CHECKPOINT, TINY_CHECKPOINT


def test_info_reports_the_12b_counts_from_a_config_file(fixtures_dir, capsys):
    assert cli.main(["info", "--model", str(fixtures_dir / "configs" / "gemma-4-12B.per_layer_config.json"),
                     "--json", "--context", "262144"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters (total)"] == "11,959,730,224"
    assert info["parameters (text)"] == "11,907,350,320"
    # raw keys stored once for the 8 global layers; storing K and V is the 4.3 GiB the issue estimated
    assert info["KV cache at 262,144 tokens (batch 1, bfloat16)"] == "2.314 GiB (raw keys; 4.314 GiB with K and V)"


def test_info_defaults_to_the_bundled_checkpoint(capsys):
    # issue 36: the default is the trained small checkpoint (a newcomer's first output is English-like), not tiny
    assert cli.main(["info"]) == 0
    assert str(SMALL_CHECKPOINT) in capsys.readouterr().out


def test_generate_streams_greedy_text(capsys):
    args = ["generate", "--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0", "--show-special"]
    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert cli.main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.strip()
    assert "6 tokens" in first.err


def test_convert_to_bfloat16(tmp_path):
    assert cli.main(["convert", "--model", str(TINY_CHECKPOINT), "--out", str(tmp_path), "--dtype", "bfloat16"]) == 0
    converted = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(TINY_CHECKPOINT / "model.safetensors"))
    assert converted.keys() == original.keys()
    assert {t.dtype.name for t in converted.values()} == {"bfloat16"}
    name = "model.language_model.embed_tokens.weight"
    np.testing.assert_allclose(converted[name].astype(np.float32), original[name], rtol=1e-2, atol=1e-2)


def test_verify_compares_equinox_nnx_and_transformers_on_the_bundled_checkpoint(capsys):
    assert cli.main(["verify", "--model", str(TINY_CHECKPOINT)]) == 0  # the one with recorded transformers outputs
    out = capsys.readouterr().out
    assert "image" in out and "text" in out and out.strip().endswith("(fp32 logits, valid positions)")
    assert "OK:" in out


def test_verify_fails_loudly_on_a_tight_tolerance(capsys):
    assert cli.main(["verify", "--model", str(TINY_CHECKPOINT), "--tolerance", "1e-12"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


# ---- failing fast and politely -----------------------------------------------------------------------------
import io  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

import gemma4_eqx as g4  # noqa: E402
from gemma4_eqx.io import hub  # noqa: E402


@pytest.fixture()
def no_load(monkeypatch):
    """Any model load fails the test: the input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(hub, "load", refuse)


def _wav(path, rate=16000, channels=1):
    import soundfile

    t = np.arange(rate // 10) / rate
    wave = np.sin(2 * math.pi * 440 * t).astype(np.float32)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return str(path)


@pytest.mark.parametrize("extra, flag", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-k", "100000"], "--top-k"),  # more than the vocabulary (read from config.json, not the weights)
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "ten"], "--max-new-tokens"),
    (["--seed", "-3"], "--seed"),
    (["--image", "/no/such/image.png"], "--image"),
    (["--audio", "/no/such/audio.wav"], "--audio"),
    (["--model", "/no/such/folder"], "--model"),
    (["--model", "./relative/missing"], "--model"),
    (["--dtype", "int8"], "--dtype"),
])
def test_generate_refuses_a_bad_input_before_loading_in_one_line(no_load, capsys, extra, flag):
    assert cli.main(["generate", "--prompt", "hi", *extra]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma4-eqx: error: ") and flag in lines[0], captured.err
    assert "Traceback" not in captured.err


def test_audio_of_another_rate_or_with_channels_is_refused_naming_the_fix(no_load, tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "hi", "--audio", _wav(tmp_path / "a.wav", rate=44100)]) == 1
    assert "sampled at 44100 Hz" in capsys.readouterr().err and True
    assert cli.main(["generate", "--prompt", "hi", "--audio", _wav(tmp_path / "b.wav", channels=2)]) == 1
    err = capsys.readouterr().err
    assert "--audio" in err and "2 channels" in err and "--downmix" in err


def test_a_file_that_is_not_an_image_is_refused_before_loading(no_load, tmp_path, capsys):
    (tmp_path / "x.png").write_text("not an image")
    assert cli.main(["generate", "--prompt", "hi", "--image", str(tmp_path / "x.png")]) == 1
    assert "--image" in capsys.readouterr().err


def test_a_folder_without_config_json_is_refused(no_load, tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "hi", "--model", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_a_broken_config_json_is_one_line_naming_the_file_and_field(no_load, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(TINY_CHECKPOINT, folder)
    d = json.loads((folder / "config.json").read_text())
    d["text_config"]["sliding_window"] = 16.9
    (folder / "config.json").write_text(json.dumps(d))
    assert cli.main(["generate", "--prompt", "hi", "--model", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: text_config.sliding_window" in err and "16.9" in err


def test_a_nan_temperature_in_generation_config_is_an_error_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(TINY_CHECKPOINT, folder)
    (folder / "generation_config.json").write_text('{"temperature": NaN}')
    assert cli.main(["generate", "--prompt", "hi", "--model", str(folder), "--max-new-tokens", "1"]) == 1
    assert "generation_config.json: temperature: expected a finite number" in capsys.readouterr().err


def test_convert_refuses_bad_outputs_and_sizes_before_loading(no_load, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["convert", "--out", str(tmp_path / "file")]) == 1
    assert "--out" in capsys.readouterr().err
    assert cli.main(["convert", "--out", str(tmp_path / "no" / "such" / "out")]) == 1
    assert "parent folder" in capsys.readouterr().err
    assert cli.main(["convert", "--out", str(tmp_path / "o"), "--max-shard-size", "-1GB"]) == 1
    assert "--max-shard-size" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(no_load):
    with pytest.raises(Exception, match="--model /no/such"):
        cli.main(["--debug", "generate", "--prompt", "hi", "--model", "/no/such"])
    with pytest.raises(Exception, match="--model /no/such"):
        cli.main(["generate", "--prompt", "hi", "--model", "/no/such", "--debug"])


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gemma4-eqx {g4.__version__}"


class _ClosedPipe(io.TextIOBase):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise io.UnsupportedOperation("fileno")


def test_a_closed_stdout_ends_generate_quietly(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    status = cli.main(["generate", "--prompt", "Hello there", "--max-new-tokens", "4", "--temperature", "0"])
    assert status == 1
    assert "Traceback" not in capsys.readouterr().err


def test_convert_writes_a_complete_folder_that_generate_and_verify_read(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", "--model", str(TINY_CHECKPOINT), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    names = set(p.name for p in out.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json", "model.safetensors.index.json"):
        assert name in names, name
        if name not in ("config.json", "model.safetensors.index.json"):
            assert (out / name).read_bytes() == (TINY_CHECKPOINT / name).read_bytes(), name
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out), "--prompt", "Hello there", "--max-new-tokens", "3",
                     "--temperature", "0", "--show-special"]) == 0
    converted = capsys.readouterr().out
    assert cli.main(["generate", "--model", str(TINY_CHECKPOINT), "--prompt", "Hello there", "--max-new-tokens", "3",
                     "--temperature", "0", "--show-special"]) == 0
    assert capsys.readouterr().out == converted  # same weights, same tokenizer, same greedy text
    assert cli.main(["verify", "--model", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    # converting again over the folder keeps it loadable and complete
    assert cli.main(["convert", "--model", str(out), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "tokenizer.json" in set(p.name for p in out.iterdir()) and g4.load(out).dtype == jnp.bfloat16
