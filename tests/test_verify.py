"""`gemma4-eqx verify --against-transformers`: transformers (in the reference venv, a subprocess) and ours, layer
by layer, on a small checkpoint with a vision tower; and a clear message (exit 2) when transformers is missing.

The reference venv is `.venv-hf` at the repository root (CI creates it: `.ci/run`), else `/work/venv-hf`. Without
either the comparison test skips, except under CI (env var CI set), where it fails.
"""

import os
import pathlib
import re
import sys

import numpy as np
import pytest

from gemma4_eqx import cli, reference

import hf_reference as ref

ROOT = pathlib.Path(__file__).resolve().parent.parent
CANDIDATES = (ROOT / ".venv-hf" / "bin" / "python", pathlib.Path("/work/venv-hf/bin/python"))


@pytest.fixture(scope="module")
def reference_python() -> str:
    for path in CANDIDATES:
        if path.is_file():
            return str(path)
    message = f"no reference venv with transformers: looked for {', '.join(map(str, CANDIDATES))}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI: .ci/run creates .venv-hf)")
    pytest.skip(message)


def test_layer_by_layer_against_transformers_on_an_image_prompt(reference_python, capsys):
    status = cli.main(["verify", "--model", str(ref.checkpoint_dir("tiny_a")), "--against-transformers",
                       "--reference-python", reference_python])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "an image of 3 x 2 patches" in err
    rows = dict(re.findall(r"^(embeddings|layer \d+ \(\w+\)|final norm|logits(?: \(model\(\.\.\.\)\))?)\s+(\S+)",
                           out, flags=re.M))
    names = ["embeddings"] + [f"layer {i} ({'full' if i == 5 else 'sliding'}_attention)" for i in range(6)] + [
        "final norm", "logits", "logits (model(...))"]
    assert list(rows) == names
    diffs = {k: float(v) for k, v in rows.items()}
    assert max(diffs.values()) <= 1e-4 and diffs["embeddings"] <= 1e-5, diffs  # fp32; measured <= 3.6e-5
    assert out.strip().splitlines()[-1].startswith("PASS: all 10 states")


def test_a_python_without_transformers_is_named_with_exit_code_2(capsys):
    # this interpreter (the package's venv) has no torch
    status = cli.main(["verify", "--against-transformers", "--reference-python", sys.executable])
    out, err = capsys.readouterr()
    if status != 2 and "PASS" in out:
        pytest.skip("this interpreter has torch and transformers")
    assert status == 2 and out == ""
    assert "transformers is not installed" in err and sys.executable in err and "--reference-python" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_no_reference_python_anywhere_says_how_to_point_at_one(monkeypatch, capsys):
    monkeypatch.delenv(reference.ENV_VAR, raising=False)
    monkeypatch.setattr(reference.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["verify", "--against-transformers"]) == 2
    err = capsys.readouterr().err
    assert "transformers is not installed for this Python" in err and reference.ENV_VAR in err
    assert "--reference-python PATH" in err and "Traceback" not in err


def test_the_environment_variable_is_used_when_this_python_lacks_transformers(monkeypatch, tmp_path):
    monkeypatch.setattr(reference.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path / "missing-python"))
    with pytest.raises(reference.ReferenceUnavailable, match=f"{reference.ENV_VAR} .*missing-python: not an "
                                                             "executable file"):
        reference.find_reference_python()


def test_report_fails_and_names_the_first_layer_over_the_limit():
    ours = {"embeddings": np.zeros((3, 4), np.float32), "layer.0": np.full((3, 4), 5.0, np.float32),
            "layer.1": np.full((3, 4), 5.0, np.float32), "logits": np.ones((3, 8), np.float32)}
    theirs = dict(ours, **{"layer.0": np.full((3, 4), 5.001, np.float32)})  # 1e-3 > 1e-4 x 5
    rows = reference.compare(ours, theirs, ["sliding_attention", "full_attention"], 1e-4)
    assert [r.ok for r in rows] == [True, False, True, True]
    text, ok = reference.report(rows, 1e-4)
    assert not ok and text.splitlines()[-1].startswith("FAIL: 1 of 4 states") and "first: layer 0 (sliding" in text
