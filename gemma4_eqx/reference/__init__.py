"""Layer-by-layer comparison with transformers on a checkpoint (`gemma4-eqx verify --against-transformers`).

transformers needs torch, which this package's environment need not have, so transformers runs in a subprocess
with a Python that has both (`find_reference_python`): the script `hf_layers.py` beside this file reads the
prompt from a temporary .npz and writes its per-layer hidden states to another. This side computes the same
states with the Equinox model (`our_layers`) and `compare` lists each one's largest difference.

The prompt (`verify_inputs`) is short and fixed: `<bos>`, 8 text tokens, an image of 3 x 2 patches of random
pixels (6 soft tokens, between the image delimiters) when the checkpoint has a vision tower, then 6 text tokens;
text ids drawn (seed 0) below every special id. Both sides run in float32 with the masks `generate()` uses
(`mask_mode="intended"`). transformers runs first and exits before the Equinox model is loaded, so the two
models are never in memory together (the 12B in float32 needs about 48 GB for each).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ENV_VAR = "GEMMA4_EQX_REFERENCE_PYTHON"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_layers.py")
MIN_TRANSFORMERS = (5, 24)
INSTALL_HINT = ("e.g. `python3.11 -m venv .venv-hf && .venv-hf/bin/pip install --index-url "
                "https://download.pytorch.org/whl/cpu torch==2.13.0 && .venv-hf/bin/pip install transformers==5.24.0 "
                "safetensors numpy` (the CPU build of torch: a plain `pip install torch` downloads a multi-GB CUDA "
                "build), then --reference-python .venv-hf/bin/python (or set " + ENV_VAR + ")")


class ReferenceUnavailable(RuntimeError):
    """No Python with torch and transformers to run the reference with (the CLI exits with status 2)."""


# ---- the reference interpreter -------------------------------------------------------------------------------
def find_reference_python(explicit: str | None = None) -> str:
    """The Python to run transformers with: `explicit` (`--reference-python`), else this interpreter if it can
    import torch and transformers, else `$GEMMA4_EQX_REFERENCE_PYTHON`. Checked by importing both in it;
    raises `ReferenceUnavailable` saying what is missing and how to point at a Python that has it."""
    if explicit is not None:
        source, python = "--reference-python", explicit
    elif importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None:
        source, python = "this Python", sys.executable
    elif os.environ.get(ENV_VAR):
        source, python = ENV_VAR, os.environ[ENV_VAR]
    else:
        raise ReferenceUnavailable(f"transformers is not installed for this Python ({sys.executable}) and "
                                   f"{ENV_VAR} is not set: pass --reference-python PATH, a Python that has torch "
                                   f"and transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}; {INSTALL_HINT}")
    python = os.path.expanduser(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ReferenceUnavailable(f"{source} {python}: not an executable file; {INSTALL_HINT}")
    probe = subprocess.run([python, "-c", "import torch, transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=_offline_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ReferenceUnavailable(f"transformers is not installed for {python} ({source}): importing torch and "
                                   f"transformers there fails with {last}; {INSTALL_HINT}")
    version = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?"
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if numbers < MIN_TRANSFORMERS:
        raise ReferenceUnavailable(f"{python} ({source}) has transformers {version}; Gemma 4 Unified needs >= "
                                   f"{'.'.join(map(str, MIN_TRANSFORMERS))}; {INSTALL_HINT}")
    return python


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ---- the prompt -----------------------------------------------------------------------------------------------
def verify_inputs(config, *, image: bool | None = None) -> dict[str, np.ndarray]:
    """The fixed prompt (see the module doc) in transformers' layout: a batch of one."""
    image = config.vision is not None if image is None else image
    special = [config.image_token_id, config.video_token_id, config.audio_token_id, config.boi_token_id,
               config.eoi_token_id, config.boa_token_id, config.eoa_token_id]
    high = min([config.text.vocab_size] + special) - 8
    rng = np.random.default_rng(0)
    before, after = rng.integers(3, high, 8), rng.integers(3, high, 6)
    ids = [config.text.bos_token_id, *before]
    types = [0] * len(ids)
    out: dict[str, np.ndarray] = {}
    if image:
        w, h = 3, 2
        ids += [config.boi_token_id] + [config.image_token_id] * (w * h) + [config.eoi_token_id]
        types += [0] + [1] * (w * h) + [0]
        patches = rng.integers(0, 256, (1, w * h, config.vision.patch_dim)).astype(np.float32) / np.float32(255)
        k = np.arange(w * h)
        out["pixel_values"] = patches
        out["image_position_ids"] = np.stack([k % w, k // w], -1)[None].astype(np.int32)
    ids += list(after)
    types += [0] * len(after)
    seq = len(ids)
    out.update(input_ids=np.array([ids], np.int32), attention_mask=np.ones((1, seq), bool),
               position_ids=np.arange(seq, dtype=np.int32)[None], mm_token_type_ids=np.array([types], np.int32))
    return out


def describe_inputs(inputs: dict[str, np.ndarray]) -> str:
    seq = inputs["input_ids"].shape[1]
    if "pixel_values" in inputs:
        n = int(inputs["pixel_values"].shape[1])
        return f"{seq} tokens: <bos>, 8 text, an image of 3 x 2 patches ({n} soft tokens), 6 text"
    return f"{seq} tokens: <bos> and 14 text tokens (the checkpoint has no vision tower)"


# ---- the two sides ----------------------------------------------------------------------------------------------
def run_transformers(python: str, folder: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """transformers' states (see `hf_layers.py`) and its meta (versions), from a subprocess of `python`."""
    with tempfile.TemporaryDirectory(prefix="gemma4-eqx-verify-") as tmp:
        src, dst = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "states.npz")
        np.savez(src, **inputs)
        proc = subprocess.run([python, SCRIPT, "--model", folder, "--inputs", src, "--out", dst],
                              capture_output=True, text=True, env=_offline_env())
        if proc.returncode != 0 or not os.path.isfile(dst):
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "(no message)"
            raise RuntimeError(f"transformers could not run {folder} (exit {proc.returncode}): {tail}")
        with np.load(dst) as data:
            states = {k: data[k] for k in data.files if k != "meta"}
            meta = json.loads(str(data["meta"]))
    return states, meta


def our_layers(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same states from the Equinox model: the embeddings after the splice, each decoder layer's output (the
    scanned stack's per-layer outputs, in flat layer order), the final norm, the logits; and `model(...)`'s own
    logits (`logits (model(...))`), which must equal the layer-by-layer path's."""
    import equinox as eqx
    import jax.numpy as jnp

    from ..layers.decoder import scan_layers
    from ..layers.kinds import LayerKind
    from ..model.masks import layer_masks

    ids = inputs["input_ids"][0]
    kwargs = {"positions": inputs["position_ids"][0], "attention_mask": inputs["attention_mask"][0],
              "mm_token_type_ids": inputs["mm_token_type_ids"][0]}
    media = {k: inputs[k] for k in ("pixel_values", "image_position_ids") if k in inputs}

    @eqx.filter_jit
    def run(model, ids, kwargs, media):
        seq = ids.shape[0]
        h0 = model.embed(ids, **media)
        slots = jnp.arange(seq)
        positions, valid, blocks = model.token_inputs(seq, kwargs["positions"], kwargs["attention_mask"],
                                                      kwargs["mm_token_type_ids"], slots, ids)
        window = model.config.text.sliding_window
        masks = layer_masks(slots, slots, valid, window, blocks, blocks, "intended")
        band = window if blocks is None else None

        def step(layer, h, _):
            h = layer(h, positions, masks[layer.kind], band if layer.kind == LayerKind.SLIDING else None)
            return h, h

        h, per_run = scan_layers(model.layers, h0, step)
        final = model.norm(h)
        return h0, per_run, final, model.logits_from_hidden(final), model(ids, **kwargs, **media)

    h0, per_run, final, logits, forward = run(model, ids, kwargs, media)
    stack = model.layers
    out = {"embeddings": np.asarray(h0)}
    for i in range(stack.num_layers):
        run_idx, repeat, slot = stack.locate(i)
        out[f"layer.{i}"] = np.asarray(per_run[run_idx][repeat, slot])
    out.update({"final_norm": np.asarray(final), "logits": np.asarray(logits), "logits (model(...))":
                np.asarray(forward)})
    return out


# ---- the comparison -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # "embeddings", "layer 3 (sliding_attention)", "final norm", "logits", "logits (model(...))"
    max_diff: float
    max_ref: float
    limit: float

    @property
    def ok(self) -> bool:
        return bool(self.max_diff <= self.limit)


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], layer_types: list[str],
            tolerance: float) -> list[Row]:
    """One row per state: max |ours - transformers| against `tolerance * max(1, max |transformers|)`."""
    rows = []
    for key, value in ours.items():
        ref_key = "logits" if key.startswith("logits") else key
        ref = theirs[ref_key]
        if ref.shape != value.shape:
            raise RuntimeError(f"{key}: transformers gives shape {list(ref.shape)}, gemma4-eqx {list(value.shape)}")
        if key.startswith("layer."):
            i = int(key.split(".")[1])
            name = f"layer {i} ({layer_types[i]})"
        else:
            name = key.replace("_", " ")
        max_ref = float(np.abs(ref).max())
        diff = float(np.abs(value.astype(np.float64) - ref.astype(np.float64)).max())
        rows.append(Row(name, diff, max_ref, tolerance * max(1.0, max_ref)))
    return rows


def report(rows: list[Row], tolerance: float) -> tuple[str, bool]:
    width = max(len(r.name) for r in rows)
    lines = [f"{'state':<{width}}  {'max |diff|':>10}  {'max |hf|':>10}  {'limit':>9}  ok"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.max_diff:>10.3e}  {r.max_ref:>10.3e}  {r.limit:>9.2e}  "
                     f"{'yes' if r.ok else 'NO'}")
    bad = [r for r in rows if not r.ok]
    rule = f"max |diff| <= {tolerance:g} x max(1, max |hf|) (float32, every position)"
    if bad:
        lines.append(f"FAIL: {len(bad)} of {len(rows)} states differ by more than {rule}; first: {bad[0].name}")
    else:
        lines.append(f"PASS: all {len(rows)} states within {rule}")
    return "\n".join(lines), not bad
