"""Every config transformers writes for gemma4_unified reads here with transformers' meaning.

Hypothesis draws the geometry a user gives `Gemma4UnifiedTextConfig` (layer pattern, head dims and KV heads of
both layer kinds, keys-as-values, window, RoPE of each kind, sometimes an explicit `per_layer_config`);
transformers itself (`scripts/hf_config_oracle.py` in `.venv-hf`, one process for the whole test) builds the
config, builds its text model, `save_pretrained`s the folder and reports what the *reloaded* file means layer by
layer. Here `Gemma4Config.from_pretrained` reads the same folder, and per layer the kind, head dim, KV heads,
query heads, whether values have their own projection, the window and the RoPE inverse frequencies (bit for bit)
must equal transformers', as must every text tensor's name and shape (our `tensor_specs` of the abstract model
against transformers' state dict).

Where transformers builds a model we refuse, the test requires the refusal to be one of the two documented ones
(a KV head count that does not divide the query heads, an odd head dim for RoPE: transformers' model builds but
cannot run a forward) and a `ConfigError` naming the field.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

import equinox as eqx
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import gemma4_eqx as g4
from gemma4_eqx.io.names import TEXT_PREFIX, tensor_specs
from gemma4_eqx.config import FULL, SLIDING
from gemma4_eqx.layers.rope import inv_frequencies

ROOT = pathlib.Path(__file__).resolve().parent.parent
CANDIDATES = (ROOT / ".venv-hf" / "bin" / "python", pathlib.Path("/work/venv-hf/bin/python"))
EXAMPLES = 280  # the issue asks for at least 200 accepted ones per run; the test counts them


class Oracle:
    def __init__(self, python: str):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the oracle's own site-packages only
        self.proc = subprocess.Popen([python, str(ROOT / "scripts" / "hf_config_oracle.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("{"), f"the transformers oracle ({python}) did not start: {line!r}"
        self.version = json.loads(line)["ready"]

    def ask(self, text_config: dict, folder: str) -> dict:
        self.proc.stdin.write(json.dumps({"text_config": text_config, "folder": folder}) + "\n")
        line = self.proc.stdout.readline()
        assert line, "the transformers oracle died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def oracle():
    for path in CANDIDATES:
        if path.is_file():
            o = Oracle(str(path))
            yield o
            o.close()
            return
    message = f"no reference venv with transformers: looked for {', '.join(map(str, CANDIDATES))}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI: .ci/run creates .venv-hf)")
    pytest.skip(message)


EVEN_DIMS = st.sampled_from([2, 4, 6, 8, 12, 16, 24, 32])


@st.composite
def text_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    divisors = [k for k in range(1, heads + 1) if heads % k == 0]
    kv_heads = st.sampled_from(divisors) if draw(st.integers(0, 19)) else st.integers(1, 8)  # 1 in 20 odd
    n_layers = draw(st.integers(1, 14))
    tc: dict = {
        "vocab_size": 262_144,
        "hidden_size": draw(st.sampled_from([8, 16, 24, 48])),
        "intermediate_size": draw(st.sampled_from([8, 32])),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(kv_heads),
        "head_dim": draw(EVEN_DIMS if draw(st.integers(0, 19)) else st.integers(1, 9)),
        "attention_k_eq_v": draw(st.booleans()),
        "sliding_window": draw(st.integers(1, 4096)),
        "final_logit_softcapping": draw(st.sampled_from([None, 30.0])),
    }
    if draw(st.booleans()):
        tc["layer_types"] = draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n_layers, max_size=n_layers))
    if draw(st.integers(0, 4)):
        tc["global_head_dim"] = draw(EVEN_DIMS)
    if draw(st.integers(0, 3)):
        tc["num_global_key_value_heads"] = draw(st.one_of(st.none(), st.sampled_from(divisors)))
    if draw(st.booleans()):
        full = (draw(st.sampled_from(["proportional", "default"])), draw(st.sampled_from([0.125, 0.25, 0.5, 1.0])))
        tc["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 10_000.0, 123_456.7]))},
            FULL: {"rope_type": full[0], "rope_theta": draw(st.sampled_from([10_000.0, 1_000_000.0])),
                   **({"partial_rotary_factor": full[1]} if full[0] == "proportional" else {})},
        }
    if not draw(st.integers(0, 3)):  # an explicit per_layer_config, as a user may give it
        kinds = draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n_layers, max_size=n_layers))
        kinds[-1] = FULL
        tc["layer_types"] = kinds
        per_type = {t: {k: v for k, v in (("head_dim", draw(EVEN_DIMS)), ("num_key_value_heads",
                                                                       draw(st.sampled_from(divisors))))
                        if draw(st.booleans())} for t in (SLIDING, FULL)}
        chosen = draw(st.sets(st.integers(0, n_layers - 1)))
        uniform = draw(st.integers(0, 4))  # mostly one geometry per kind (transformers refuses mixed kinds)
        tc["per_layer_config"] = {
            i: per_type[kinds[i]] for i in range(n_layers)
            if (per_type[kinds[i]] and (uniform or i in chosen))}
    return tc


def documented_refusal(view: dict) -> str | None:
    for layer in view["layers"]:
        if layer["num_attention_heads"] % layer["num_key_value_heads"]:
            return "does not divide num_attention_heads"
        if layer["head_dim"] % 2:
            return "RoPE needs an even head dimension"
    return None


def our_view(cfg: g4.Gemma4Config) -> dict:
    t = cfg.text
    layers, inv = [], {}
    for i in range(t.num_hidden_layers):
        g = t.layer_geometry(i)
        layers.append({"layer_type": g.layer_type, "head_dim": g.head_dim, "num_key_value_heads": g.num_key_value_heads,
                       "num_attention_heads": t.num_attention_heads, "has_v_proj": g.has_v_proj,
                       "sliding_window": g.sliding_window if g.layer_type == SLIDING else None})
        inv[g.layer_type] = inv_frequencies(g.rope, g.head_dim).tolist()
    return {"layers": layers, "inv_freq": inv}


def our_text_tensors(cfg: g4.Gemma4Config) -> dict:
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg.replace(vision=None, audio=None), key=jax.random.key(0)))
    return {s.name[len(TEXT_PREFIX):]: list(s.shape) for s in tensor_specs(abstract) if s.name.startswith(TEXT_PREFIX)}


REFUSALS: set[str] = set()
COUNTS = {"accepted": 0, "refused by transformers": 0, "refused as documented": 0}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tc=text_configs())
def test_configs_transformers_writes_read_with_its_meaning(oracle, tc):
    with tempfile.TemporaryDirectory() as folder:
        view = oracle.ask(tc, folder)
        if not view["ok"]:
            COUNTS["refused by transformers"] += 1
            REFUSALS.add(view["error"][:120])
            return
        reason = documented_refusal(view)
        if reason is not None:
            with pytest.raises(g4.ConfigError, match=reason):
                g4.Gemma4Config.from_pretrained(folder)
            COUNTS["refused as documented"] += 1
            return
        cfg = g4.Gemma4Config.from_pretrained(folder)
        ours = our_view(cfg)
        assert ours["layers"] == view["layers"], (tc, json.loads(pathlib.Path(folder, "config.json").read_text()))
        assert set(ours["inv_freq"]) == set(view["inv_freq"])
        for kind, theirs in view["inv_freq"].items():
            np.testing.assert_array_equal(np.float32(ours["inv_freq"][kind]), np.float32(theirs), err_msg=kind)
        if COUNTS["accepted"] % 4 == 0:  # shapes of every text tensor, on a quarter of the examples (cost)
            assert our_text_tensors(cfg) == view["tensors"], tc
        COUNTS["accepted"] += 1


def test_at_least_200_transformers_configs_were_compared(oracle):
    # runs after the property test in the same module (pytest keeps file order)
    print(f"transformers configs: {COUNTS}; transformers refused: {sorted(REFUSALS)}")
    assert COUNTS["accepted"] >= 200, COUNTS
