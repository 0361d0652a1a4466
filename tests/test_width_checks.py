"""Every public entry that takes hidden states, tap values or input embeddings checks their width statically: a wrong
width raises an error naming the argument, the expected shape and the one given, before any layer scan runs, with
and without GEMMA4_EQX_TYPECHECK (in this process the tests' jaxtyping hook is on; the subprocesses set the switch
both ways). No compilation: every error comes from Python before anything is traced into a scan."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import traceback

import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ = 8


def cases(model) -> list[tuple[str, str, object]]:
    """(entry, argument named in the error, call) for each entry given residuals / values twice too wide."""
    h = model.config.text.hidden_size
    wide = 2 * h
    ids = np.arange(3, 3 + SEQ, dtype=np.int32)
    cache = g4.KVCache.init(model.config, max_len=32, dtype=model.dtype)
    bad = np.zeros((SEQ, wide), np.float32)
    f32 = lambda *shape: np.zeros(shape, np.float32)
    return [
        ("decode_hidden", "h", lambda: model.decode_hidden(jnp.asarray(bad))),
        ("logits_from_hidden", "h", lambda: model.logits_from_hidden(jnp.asarray(bad))),
        ("taps.logit_lens", "residual", lambda: g4.taps.logit_lens(model, f32(2, SEQ, wide))),
        ("model(taps=patch, NumPy values)", "taps.values",
         lambda: model(ids, taps=g4.Taps(patch=(1,), values=f32(1, SEQ, wide)))),
        ("model(taps=add)", "taps.values", lambda: model(ids, taps=g4.Taps(add=(1,), values=f32(1, wide)))),
        ("model(inputs_embeds=)", "inputs_embeds", lambda: model(inputs_embeds=bad)),
        ("model(input_ids, inputs_embeds=)", "inputs_embeds", lambda: model(ids, inputs_embeds=bad)),
        ("hidden_states(inputs_embeds=)", "inputs_embeds", lambda: model.hidden_states(inputs_embeds=bad)),
        ("splice_media", "inputs_embeds", lambda: model.splice_media(bad, ids)),
        ("prefill(inputs_embeds=)", "inputs_embeds", lambda: model.prefill(None, cache, inputs_embeds=bad)),
        ("forward_with_cache(inputs_embeds=)", "inputs_embeds",
         lambda: g4.decode.forward_with_cache(model, None, cache, inputs_embeds=bad)),
        ("decode_step(taps=add)", "taps.values",
         lambda: model.decode_step(jnp.int32(5), cache, taps=g4.Taps(add=(2,), values=f32(1, wide)))),
        ("generate(taps=add)", "taps.values",
         lambda: g4.generate(model, ids, max_new_tokens=2, temperature=0.0,
                             taps=g4.Taps(add=(2,), values=f32(1, wide)))),
        ("generate(inputs_embeds=)", "inputs_embeds",
         lambda: g4.generate(model, inputs_embeds=bad, max_new_tokens=2, temperature=0.0)),
        ("score(inputs_embeds=)", "inputs_embeds", lambda: g4.score(model, None, ids[:3], inputs_embeds=bad)),
    ]


def check_all(model) -> list[str]:
    """One line per case: 'ok <entry>' or what went wrong."""
    h = model.config.text.hidden_size
    out = []
    for entry, name, call in cases(model):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - every kind is judged below
            message = str(e)
            frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
            problems = []
            if name not in message:
                problems.append(f"does not name {name!r}")
            if not re.search(rf"\b{h}\b", message) or not re.search(rf"\b{2 * h}\b", message):
                problems.append(f"does not give both widths {h} and {2 * h}")
            if "scan_layers" in frames or "scan" in frames:
                problems.append("raised inside the layer scan")
            if problems:
                out.append(f"FAIL {entry}: {type(e).__name__}: {message[:300]} ({'; '.join(problems)})")
            else:
                out.append(f"ok {entry}")
        else:
            out.append(f"FAIL {entry}: raised nothing")
    return out


@pytest.fixture(scope="module")
def model():
    return g4.load(g4.assets.TINY_CHECKPOINT)


def test_wrong_widths_are_named_before_any_scan(model):
    results = check_all(model)
    assert all(r.startswith("ok") for r in results), "\n".join(results)
    assert len(results) == len(cases(model))


@pytest.mark.parametrize("switch", [None, "1"])
def test_wrong_widths_are_named_with_and_without_the_typecheck_switch(switch):
    code = ("import sys; sys.path.insert(0, 'tests'); import gemma4_eqx as g4, test_width_checks as t\n"
            "print('typecheck', g4.typecheck.enabled())\n"
            "print('\\n'.join(t.check_all(g4.load(g4.assets.TINY_CHECKPOINT))))\n")
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_EQX_TYPECHECK"}
    env.update(JAX_PLATFORMS="cpu", JAX_TRACEBACK_FILTERING="off",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    if switch is not None:
        env["GEMMA4_EQX_TYPECHECK"] = switch
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == f"typecheck {switch is not None}"
    assert all(line.startswith("ok") for line in lines[1:]) and len(lines) > 10, run.stdout
