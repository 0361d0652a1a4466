#!/usr/bin/env python
"""Record LoRA adapters written by PEFT for transformers' model of the bundled small checkpoint, with logits.

The reference for reading and writing adapters in PEFT's format (issue 36): PEFT wraps
``Gemma4UnifiedForConditionalGeneration`` loaded from ``gemma4_eqx/assets/small`` (fp32, eager attention, CPU),
its LoRA weights are filled from a seeded NumPy generator (so that B is not zero and nothing depends on torch's
RNG), ``save_pretrained`` writes the adapter, and the logits of the base and of the adapted model are recorded on
three short prompts. The script then checks its own outputs: a fresh base model + ``PeftModel.from_pretrained``
on the written folder gives the same logits, and so does the base model with every adapted weight replaced by
``W + scaling * B @ A`` computed in NumPy from the files alone (the format described below, independently of PEFT).

Usage (deterministic; overwrites what it writes; needs ``peft`` in ``.venv-hf``, see DEVELOPERS.md)::

    .venv-hf/bin/pip install peft==0.21.2
    .venv-hf/bin/python scripts/record_peft_adapter.py --out tests/fixtures/peft

Outputs (never edit them by hand):

- ``<out>/adapter/{adapter_config.json, adapter_model.safetensors}``: rank 8, lora_alpha 16 (scaling 2), on
  q_proj, k_proj, v_proj, o_proj of every text decoder layer (``target_modules`` is the regex
  ``.*language_model\\.layers\\.\\d+\\.self_attn\\.(q_proj|k_proj|v_proj|o_proj)``, so no multimodal embedder
  projection can match); 23 modules, 46 tensors (the full-attention layer 5 has no ``v_proj``: with
  ``attention_k_eq_v`` its values are its keys, i.e. the output of the *adapted* ``k_proj`` before ``k_norm``).
- ``<out>/adapter_patterns/...``: the same targets given as a list ``["q_proj", "k_proj", "v_proj", "o_proj"]``
  restricted by ``layers_to_transform=[0, 3, 5]``, with ``use_rslora=True``, ``rank_pattern={"o_proj": 4}`` and
  ``alpha_pattern={"layers\\.5\\.self_attn\\.q_proj": 32}``: per-module rank and scaling
  (``alpha / sqrt(r)``) that only the config says.
- ``<out>/cases.npz``: ``ids/<i>`` (int32, the checkpoint tokenizer's ids of ``PROMPTS[i]``, ``<bos>`` = 2
  first, as transformers' tokenizer adds it), ``base/<i>``, ``adapter/<i>``, ``adapter_patterns/<i>`` (float32
  ``[len, vocab]`` logits of one unbatched sequence, no attention mask), ``meta`` (0-d JSON: versions, prompts,
  seeds, init scales, PEFT's per-module ``scaling`` for each adapter, the self-check differences).

PEFT's on-disk format for this model (0.21.2; read off the written files, not only PEFT's docs)
------------------------------------------------------------------------------------------------
``adapter_model.safetensors``: metadata ``{"format": "pt"}``; one pair of tensors per adapted ``nn.Linear``, named
after the module's path in ``PeftModel`` (``base_model.model.`` + the path in transformers' model), **without the
adapter name** (PEFT names the live parameter ``...q_proj.lora_A.default.weight``; ``save_pretrained`` strips
``default.`` and ``load_adapter`` puts the loading adapter's name back)::

    base_model.model.model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in_features]
    base_model.model.model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out_features, r]

Orientation is torch's ``nn.Linear`` (``weight`` is ``[out, in]``, ``y = x @ W.T``): the adapted layer computes
``y = x @ W.T + scaling * (x @ A.T) @ B.T``, i.e. ``W_eff = W + scaling * B @ A`` (``[out, in]``; in our
``[in, out]`` layout that is ``W_eff.T = W.T + scaling * A.T @ B.T``). Dtype is the adapted model's (float32
here); a bf16 file loads too (``load_state_dict`` casts into the fp32 parameters). For the small checkpoint:
q ``A [8, 128]  B [128, 8]`` (layer 5: ``B [256, 8]``), k and v ``A [8, 128]  B [64, 8]``, o ``A [8, 128]
B [128, 8]`` (layer 5: ``A [8, 256]``). No bias tensors (``bias: "none"``, ``lora_bias: false``).

``adapter_config.json`` (PEFT writes every ``LoraConfig`` field, sorted, about 50; the loader ignores unknown
keys with a warning). Fields that decide what a loader must do:

- ``peft_type: "LORA"`` (the one required key: selects the config class; ``{peft_type, r, lora_alpha,
  target_modules}`` alone loads these files to the same logits; every other field takes ``LoraConfig``'s default), ``task_type: null`` (``PeftModel``; a
  ``"CAUSAL_LM"`` one loads the same weights through ``PeftModelForCausalLM``, same key prefix).
- ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``: per module,
  ``r_m = rank_pattern[k]`` and ``alpha_m = alpha_pattern[k']`` for the first key ``k`` (dict order) such that
  ``re.match(rf"(.*\\.)?({k})$", module_path)`` matches (module path as in transformers' model, e.g.
  ``model.language_model.layers.5.self_attn.o_proj``), else ``r`` / ``lora_alpha``;
  ``scaling_m = alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with ``use_rslora``. ``r_m`` is also the
  tensors' rank (``A [r_m, in]``), so a mismatch with the file is a shape error.
- ``target_modules`` (+ ``layers_to_transform``, ``layers_pattern``, ``exclude_modules``): which modules PEFT
  wraps *before* loading the weights. A string is a regex ``re.fullmatch``ed against the module path; a list
  matches a path equal to an entry or ending in ``.entry``, then ``layers_to_transform`` keeps the paths whose
  first ``.<name>.<digits>.`` index is listed. A wrapped module absent from the file keeps its fresh init
  (``init_lora_weights``: true means B = 0, harmless; false means random B, silently wrong logits, PEFT only
  warns "Found missing adapter keys"); a file tensor with no wrapped module is dropped silently. A writer must
  therefore make ``target_modules`` cover exactly the tensors it writes (an explicit list of full module paths
  is the exact form; PEFT turns a list into a set and writes it in the set's order, which depends on
  ``PYTHONHASHSEED``: this script sorts it).
- ``use_dora`` (true adds ``lora_magnitude_vector`` tensors and another formula), ``fan_in_fan_out`` (true only
  for GPT-2 style Conv1D; transposes ``W``), ``bias != "none"`` / ``lora_bias`` (extra bias tensors),
  ``modules_to_save`` (full tensors ``...<module>.weight`` to replace), ``trainable_token_indices``,
  ``layer_replication``, ``target_parameters``, ``alora_invocation_tokens``, ``use_bdlora``/``use_qalora``:
  change the computation; a reader that supports plain LoRA must refuse them when set.
- Informational only: ``base_model_name_or_path`` (used by ``AutoPeftModel*`` to find the base), ``revision``,
  ``inference_mode``, ``peft_version``, ``auto_mapping``, ``lora_dropout`` (identity at inference),
  ``init_lora_weights`` (only affects modules missing from the file).

PEFT 0.21.2 also *loads* names without the ``base_model.model.`` prefix or with ``.default`` before ``.weight``
(same logits), but never writes them; ``base_model.`` alone is not recognised (every module "missing").
PEFT also writes a ``README.md`` model card; it is not kept. Loading applies transformers v5's checkpoint
conversion mapping for ``gemma4_unified`` to the adapter's keys; it renames only vision-embedder keys
(``vision_embedder.*`` -> ``embed_vision.*``), so the decoder's names above pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoTokenizer, Gemma4UnifiedForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

EXPECTED_TRANSFORMERS = "5.24.0"
EXPECTED_PEFT = "0.21.2"
SMALL_REL = "gemma4_eqx/assets/small"
SMALL = os.path.join(ROOT, SMALL_REL)
PREFIX = "base_model.model."
PROMPTS = [
    "This program is free software; you can redistribute it",
    "You may convey verbatim copies of the Program's source code",
    "THE SOFTWARE IS PROVIDED AS IS",
]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "adapter": dict(
        seed=36, config=dict(r=8, lora_alpha=16, target_modules=r".*language_model\.layers\.\d+\.self_attn\."
                             r"(q_proj|k_proj|v_proj|o_proj)")),
    "adapter_patterns": dict(
        seed=3636, config=dict(r=8, lora_alpha=16, target_modules=ATTN, layers_to_transform=[0, 3, 5],
                               use_rslora=True, rank_pattern={"o_proj": 4},
                               alpha_pattern={r"layers\.5\.self_attn\.q_proj": 32})),
}
# A ~ N(0, 1/in), B ~ N(0, B_STD^2): the delta's entries are ~0.3x the base weights' (std ~0.035) at scaling 2.
B_STD = 0.02


def load_base() -> Gemma4UnifiedForConditionalGeneration:
    return Gemma4UnifiedForConditionalGeneration.from_pretrained(
        SMALL, dtype=torch.float32, attn_implementation="eager").eval()


def logits(model, ids: list[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor(x[None].astype(np.int64)), use_cache=False).logits[0].numpy()
                for x in ids]


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """Module path in transformers' model -> PEFT LoRA layer."""
    return {name.removeprefix(PREFIX): m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def fill(model, seed: int) -> dict:
    """Draw every LoRA A and B from one seeded NumPy generator (modules in sorted order); return the init."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, m in sorted(lora_modules(model).items()):
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        r, n_in = a.shape
        with torch.no_grad():
            a.copy_(torch.from_numpy((rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32)))
            b.copy_(torch.from_numpy((rng.standard_normal(tuple(b.shape)) * B_STD).astype(np.float32)))
        out[path] = {"r": int(r), "scaling": float(m.scaling["default"])}
    return out


def save_adapter(model, folder: str) -> None:
    """save_pretrained into a scratch folder; keep only the two files a loader reads."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(os.path.join(tmp, name), os.path.join(folder, name))


def merged_logits(folder: str, ids: list[np.ndarray]) -> list[np.ndarray]:
    """Logits of the base with W <- W + scaling * B @ A, everything read from the adapter folder in NumPy."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    base = load_base()
    state = base.state_dict()
    paths = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    assert len(tensors) == 2 * len(paths), sorted(tensors)

    def pattern(table: dict, path: str, default):
        for key, value in table.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    for path in paths:
        a = tensors[f"{PREFIX}{path}.lora_A.weight"]
        b = tensors[f"{PREFIX}{path}.lora_B.weight"]
        r = pattern(cfg["rank_pattern"], path, cfg["r"])
        alpha = pattern(cfg["alpha_pattern"], path, cfg["lora_alpha"])
        assert a.shape[0] == r == b.shape[1], (path, a.shape, b.shape, r)
        s = alpha / (np.sqrt(r) if cfg["use_rslora"] else r)
        w = state[f"{path}.weight"].numpy().astype(np.float64)
        state[f"{path}.weight"] = torch.from_numpy((w + s * (b.astype(np.float64) @ a)).astype(np.float32))
    base.load_state_dict(state)
    return logits(base, ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "peft"))
    args = ap.parse_args()
    for name, have, want in [("transformers", transformers.__version__, EXPECTED_TRANSFORMERS),
                             ("peft", peft.__version__, EXPECTED_PEFT)]:
        if have != want:
            sys.exit(f"{name} {want} expected, found {have}")
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(SMALL)
    ids = [np.asarray(tok(p)["input_ids"], np.int32) for p in PROMPTS]
    assert all(x[0] == tok.bos_token_id == 2 for x in ids)
    arrays = {f"ids/{i}": x for i, x in enumerate(ids)}
    base_logits = logits(load_base(), ids)
    arrays.update({f"base/{i}": x for i, x in enumerate(base_logits)})
    meta = {"checkpoint": SMALL_REL, "dtype": "float32", "attn_implementation": "eager", "prompts": PROMPTS,
            "transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__,
            "script": "scripts/record_peft_adapter.py",
            "init": f"per module in sorted path order: A = N(0,1)/sqrt(in), B = N(0,1)*{B_STD}, float64 -> "
                    "float32, one numpy default_rng(seed) per adapter", "adapters": {}}

    for name, spec in ADAPTERS.items():
        folder = os.path.join(args.out, name)
        cfg = LoraConfig(lora_dropout=0.0, init_lora_weights=False, bias="none", **spec["config"])
        model = get_peft_model(load_base(), cfg)
        model.peft_config["default"].base_model_name_or_path = SMALL_REL
        if isinstance(model.peft_config["default"].target_modules, set):  # PEFT keeps a list as a set: fix its order
            model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
        modules = fill(model, spec["seed"])
        model.eval()
        adapted = logits(model, ids)
        save_adapter(model, folder)
        arrays.update({f"{name}/{i}": x for i, x in enumerate(adapted)})

        # self-checks: PEFT reloads the folder to the same logits; so does the merge computed from the files.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = logits(PeftModel.from_pretrained(load_base(), folder).eval(), ids)
        missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
        assert not missing, missing
        d_reload = max(float(np.abs(x - y).max()) for x, y in zip(adapted, reloaded))
        d_merged = max(float(np.abs(x - y).max()) for x, y in zip(adapted, merged_logits(folder, ids)))
        d_base = max(float(np.abs(x - y).max()) for x, y in zip(adapted, base_logits))
        assert d_reload == 0.0, d_reload
        assert d_merged < 1e-4, d_merged
        assert d_base > 0.5, d_base
        meta["adapters"][name] = {"seed": spec["seed"], "config": spec["config"], "modules": modules,
                                  "max_abs_diff_vs_base": d_base, "max_abs_diff_merged": d_merged}
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        print(f"{folder}: {len(modules)} modules, {size} bytes; max |adapted - base| {d_base:.3f}, "
              f"reloaded {d_reload:.1e}, merged in numpy {d_merged:.1e}")

    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path = os.path.join(args.out, "cases.npz")
    np.savez_compressed(path, **arrays)
    ckpt = os.path.getsize(os.path.join(SMALL, "model.safetensors"))
    print(f"{path}: prompts of {[len(x) for x in ids]} tokens; checkpoint model.safetensors {ckpt} bytes")


if __name__ == "__main__":
    main()
