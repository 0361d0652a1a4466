"""LoRA adapters as files in PEFT's format: `save_adapters` writes only the adapters, `load_adapters` puts them onto a
base model (ours), and both read and write what PEFT (0.21) writes for transformers' model of the same checkpoint.

A folder holds two files (scripts/record_peft_adapter.py documents PEFT's format as read off its files):

- `adapter_model.safetensors`: per adapted projection `base_model.model.<path>.lora_A.weight [r, in]` and
  `...lora_B.weight [out, r]`, `<path>` the module's path in transformers' model
  (`model.language_model.layers.5.self_attn.q_proj`, `io.names.TEXT_PREFIX`), torch's `[out, in]` orientation:
  the adapted projection is `W + scaling * B @ A`; in ours (`[in, out]`) `lora_a = A.T`, `lora_b = B.T`.
- `adapter_config.json`: `peft_type "LORA"`, `r`, `lora_alpha`, `target_modules` and the fields that refine them.

Reading follows PEFT 0.21.2 rule for rule: the targeted modules are those `target_modules` selects (a string is
`re.fullmatch`ed against the module path, `"all-linear"` is every linear layer but the output one, a list matches a
path equal to an entry or ending in `.entry`, then `layers_to_transform` / `layers_pattern` keep the listed layer
indices), minus `exclude_modules`; each module's rank and alpha are `rank_pattern` / `alpha_pattern`'s first key `k`
with `re.match(rf"(.*\\.)?({k})$", path)`, else `r` / `lora_alpha`; its scaling is `alpha / r`, or
`alpha / sqrt(r)` with `use_rslora`. It is stricter than PEFT, which warns or drops silently: a targeted module
without both tensors, a tensor no targeted module takes, a shape that is not `[r_m, in]` / `[out, r_m]`, a target
this package cannot adapt (anything outside the text decoder's projections) and every field that plain LoRA
cannot honour (`use_dora`, `fan_in_fan_out`, `bias`, `lora_bias`, `modules_to_save`, `trainable_token_indices`,
`layer_replication`, `target_parameters`, `alora_invocation_tokens`, base-rewriting `init_lora_weights`, other
`peft_type`s, ...) raise `AdapterError` naming the file, the field or tensor and the value. Full-attention layers
with `attention_k_eq_v` have no `v_proj` (their values are the raw keys): an adapter on their `k_proj` adapts the
values too, as in transformers + PEFT.

Writing names every adapted module explicitly (`target_modules`: the sorted list of full paths, the exact form),
with the most common rank and alpha as `r` / `lora_alpha` and the others in `rank_pattern` / `alpha_pattern`
(escaped full paths); `alpha_m = scaling_m * r_m`, chosen so that PEFT's `alpha_m / r_m` is the scaling bit for
bit. The folder is written atomically (`save.replace_folder`). The adapters are put on and read out of the
model by `g4.surgery.attach_lora` / `lora_weights` (stacked runs, padded ranks and per-layer scales: see
`gemma4_eqx.layers.lora`).
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ..config.fields import short
from ..layers.lora import LoRALinear
from ..model.gemma4 import Gemma4
from ..model.surgery import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    LoRAWeights,
    attach_lora,
    lora_weights,
)
from ..utils.files import FileReadError, read_json
from .adapter_config import OUTPUT_LAYER, AdapterError, PeftLoraConfig
from .hub import resolve
from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    SAFE_INDEX,
    SAFE_SINGLE,
    TEXT_PREFIX,
    VISION_ALIAS_PREFIX,
    VISION_PREFIX,
    VISION_PROJECTION,
    VISION_PROJECTION_ALIAS,
    CheckpointError,
    tensor_specs,
)
from .safetensors import DTYPE_NAMES, SafetensorsFile, write_file
from .save import replace_folder, write_json
from .surgery import LEAVES_FILE as SURGERY_LEAVES

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "adapter_config", "load_adapters", "read_adapters",
           "save_adapters"]

MAX_CONFIG_BYTES = 16 << 20
LAYER_MODULE = re.compile(re.escape(TEXT_PREFIX) + r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
TENSOR_NAME = re.compile(r"(?P<path>.+)\.lora_(?P<ab>[AB])(?P<default>\.default)?\.weight")


# ---- module paths --------------------------------------------------------------------------------
def module_path(layer: int, projection: str) -> str:
    """transformers' module path of a decoder projection: `model.language_model.layers.3.mlp.up_proj`."""
    owner = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"{TEXT_PREFIX}layers.{layer}.{owner}.{projection}"


def _transformers_module(tensor_name: str) -> str:
    """The module path in transformers' model of an on-disk `<module>.weight` (vision keys are renamed on load)."""
    if tensor_name == VISION_PROJECTION:
        tensor_name = VISION_PROJECTION_ALIAS
    elif tensor_name.startswith(VISION_PREFIX):
        tensor_name = VISION_ALIAS_PREFIX + tensor_name[len(VISION_PREFIX):]
    return tensor_name.removesuffix(".weight")


def linear_modules(model: Gemma4) -> dict[str, tuple[tuple[int, str] | None, tuple[int, int]]]:
    """Every linear layer of transformers' model of `model`'s checkpoint: module path -> ((layer, projection) for
    a decoder projection, None for one this package cannot adapt, `[out, in]`), from the name table."""
    is_lora = lambda x: isinstance(x, LoRALinear)
    if any(is_lora(x) for x in jax.tree.leaves(model, is_leaf=is_lora)):
        raise AdapterError("the base model already holds LoRA adapters; load adapters onto the stock model "
                           "(g4.load(base)), or fold the present ones in first with g4.surgery.merge_lora")
    try:
        specs = tensor_specs(model)
    except CheckpointError as e:
        raise AdapterError(f"the base model: {e}. Adapters load onto a stock float Gemma 4 (g4.load(...)); to "
                           "combine them with other edits, load the adapters first") from None
    out: dict[str, tuple[tuple[int, str] | None, tuple[int, int]]] = {}
    for s in specs:
        if not s.transpose:
            continue
        path = _transformers_module(s.name)
        m = LAYER_MODULE.fullmatch(path)
        key = (int(m.group(1)), m.group(3)) if m and m.group(3) in ATTENTION_PROJECTIONS + MLP_PROJECTIONS else None
        out[path] = (key, s.shape)
    out[OUTPUT_LAYER] = (None, tuple(model.embed_tokens.shape))
    return out


# ---- reading -------------------------------------------------------------------------------------
def _adapter_folder(folder_or_repo: str | os.PathLike, **hub: Any) -> str:
    folder = resolve(folder_or_repo, allow_patterns=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), **hub)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            if name == ADAPTER_CONFIG and os.path.isfile(os.path.join(folder, "config.json")):
                raise AdapterError(f"{folder}: no {ADAPTER_CONFIG}; this is a model checkpoint (config.json): load it "
                                   "with g4.load")
            other = [n for n in ("adapter_model.bin",) if os.path.isfile(os.path.join(folder, n))]
            hint = f" (found {other[0]}: pickled weights are refused; only safetensors are read)" if other else ""
            raise AdapterError(f"{folder}: {name} is missing; expected a PEFT adapter folder ({ADAPTER_CONFIG} + "
                               f"{ADAPTER_WEIGHTS}){hint}")
    return folder


def read_adapters(model: Gemma4, folder: str | os.PathLike) -> dict[tuple[int, str], LoRAWeights]:
    """The adapters of a PEFT adapter folder for `model`'s checkpoint, checked against `model` and the config:
    `(layer, projection) -> LoRAWeights` (host arrays, our orientation). See the module docstring."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        raw = read_json(config_path, MAX_CONFIG_BYTES, expect=dict, what="a PEFT adapter_config.json")
    except FileReadError as e:
        raise AdapterError(str(e)) from None
    cfg = PeftLoraConfig(raw, config_path)
    modules = linear_modules(model)
    targeted = [p for p in modules if cfg.targets(p)]
    if not targeted:
        raise AdapterError(f"{config_path}: target_modules = {short(cfg.target_modules, 120)} (layers_to_transform "
                           f"{short(cfg.layers, 120)}) selects no linear layer of this model; e.g. "
                           f"{module_path(0, 'q_proj')}")
    foreign = [p for p in targeted if modules[p][0] is None]
    if foreign:
        raise AdapterError(f"{config_path}: target_modules = {short(cfg.target_modules, 120)} selects {foreign[0]}"
                           f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; this package adapts "
                           "only the text decoder's projections (self_attn q/k/v/o_proj, mlp gate/up/down_proj)")

    weights_path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        file = SafetensorsFile(weights_path)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise AdapterError(f"{weights_path}: cannot be read as safetensors ({e})") from None
    stored: dict[tuple[str, str], str] = {}
    for name in file.keys():
        m = TENSOR_NAME.fullmatch(name.removeprefix(PEFT_PREFIX))
        if m is None:
            raise AdapterError(f"{weights_path}: tensor {name!r} is not a LoRA weight; expected "
                               f"{PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight (plain LoRA: no DoRA "
                               "magnitude, bias or embedding tensors)")
        key = (m.group("path"), m.group("ab"))
        if key in stored:
            raise AdapterError(f"{weights_path}: {key[0]}'s lora_{key[1]} is stored twice ({stored[key]!r} and "
                               f"{name!r})")
        stored[key] = name
    wanted = set(targeted)
    for (path, ab), name in sorted(stored.items()):
        if path not in wanted:
            why = ("is not a linear layer of this model" if path not in modules else
                   f"is not targeted by {ADAPTER_CONFIG} (target_modules {short(cfg.target_modules, 120)}, "
                   f"layers_to_transform {short(cfg.layers, 120)}, exclude_modules {short(cfg.exclude_modules, 120)})")
            raise AdapterError(f"{weights_path}: tensor {name!r} matches no adapted module: {path} {why}; PEFT "
                               "would drop it silently")
    out: dict[tuple[int, str], LoRAWeights] = {}
    for path in targeted:
        (layer, projection), (n_out, n_in) = modules[path]
        missing = [ab for ab in "AB" if (path, ab) not in stored]
        if missing:
            raise AdapterError(f"{weights_path}: no lora_{'/'.join(missing)} tensor for {path}, which {ADAPTER_CONFIG}"
                               f" targets (PEFT would keep its initialisation with only a warning)")
        r = cfg.rank(path)
        a_name, b_name = stored[path, "A"], stored[path, "B"]
        for name, want in ((a_name, (r, n_in)), (b_name, (n_out, r))):
            if file.shape(name) != want:
                raise AdapterError(f"{weights_path}: {name} has shape {list(file.shape(name))}, expected "
                                   f"{list(want)} (rank {r} from {ADAPTER_CONFIG}, the projection is "
                                   f"[{n_out}, {n_in}])")
            if file.dtype_name(name) not in ("F16", "BF16", "F32", "F64"):
                raise AdapterError(f"{weights_path}: {name} has dtype {file.dtype_name(name)}; expected a float")
        a, b = file.read(a_name), file.read(b_name)
        out[layer, projection] = LoRAWeights(a.T, b.T, cfg.scaling(path))
    return out


def load_adapters(model: Gemma4, folder_or_repo: str | os.PathLike, *, revision: str | None = None,
                  token: str | bool | None = None, local_files_only: bool | None = None,
                  cache_dir: str | None = None) -> Gemma4:
    """`model` with the LoRA adapters of a PEFT adapter folder (or Hub repo id) on its projections.

    The folder is what `save_adapters` or PEFT's `save_pretrained` wrote for this checkpoint
    (`adapter_config.json` + `adapter_model.safetensors`); `model` is the stock base, e.g. `g4.load(base)`.
    The result computes `W x + scaling * B (A x)` on every adapted projection, as transformers + PEFT does;
    `g4.surgery.merge_lora` folds them in, `g4.surgery.only_lora` trains them, `save_adapters` writes them back.
    Everything the format can say that plain LoRA cannot honour is refused by name (see the module docstring).
    """
    folder = _adapter_folder(folder_or_repo, revision=revision, token=token, local_files_only=local_files_only,
                             cache_dir=cache_dir)
    weights = read_adapters(model, folder)
    try:
        return attach_lora(model, weights)
    except ValueError as e:
        raise AdapterError(f"{folder}: {e}") from None


# ---- writing -------------------------------------------------------------------------------------
def _alpha(scale: float, rank: int) -> float | int:
    """A lora_alpha whose `alpha / rank` (PEFT's scaling) is `scale` exactly, as an int when it is whole."""
    alpha = scale * rank
    for _ in range(8):
        if alpha / rank == scale:
            break
        alpha = math.nextafter(alpha, math.inf if alpha / rank < scale else -math.inf)
    if alpha / rank != scale:
        raise AdapterError(f"scaling {scale!r} at rank {rank}: no lora_alpha gives it exactly")
    return int(alpha) if alpha.is_integer() and abs(alpha) < 2**53 else alpha


def _most_common(values: list[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def adapter_config(weights: Mapping[tuple[int, str], LoRAWeights], *,
                   base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json `save_adapters` writes for `weights`: every module named in full, the most common
    rank and alpha as `r` / `lora_alpha`, the rest as `rank_pattern` / `alpha_pattern`."""
    keys = sorted(weights, key=lambda k: (k[0], (ATTENTION_PROJECTIONS + MLP_PROJECTIONS).index(k[1])))
    paths = [module_path(*k) for k in keys]
    ranks = [weights[k].rank for k in keys]
    alphas = [_alpha(float(weights[k].scale), weights[k].rank) for k in keys]
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": r, "lora_alpha": alpha, "use_rslora": False,
        "target_modules": paths, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(p): k for p, k in zip(paths, ranks) if k != r},
        "alpha_pattern": {re.escape(p): a for p, a in zip(paths, alphas) if a != alpha},
        "bias": "none", "lora_bias": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
    }


def _check_target(folder: str) -> None:
    """An adapter save replaces the folder's `adapter_model.safetensors` and `adapter_config.json` and keeps its other
    non-weight files (a README); a folder holding a model, or any other weights, is refused: the save would drop
    them."""
    if not os.path.isdir(folder):
        return
    model_files = [n for n in ("config.json", SAFE_SINGLE, SAFE_INDEX, SURGERY_LEAVES)
                   if os.path.exists(os.path.join(folder, n))]
    if model_files:
        raise AdapterError(f"{folder}: holds a model ({', '.join(model_files)}); save the adapters into a folder "
                           "of their own (the save replaces the folder's weights)")
    others = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".partial", ".bin"))
                    and n != ADAPTER_WEIGHTS)
    if others:
        raise AdapterError(f"{folder}: holds weights that are not this adapter's ({', '.join(others[:5])}); the save "
                           "would drop them: move them away or save into another folder")


def save_adapters(model: Gemma4, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write only `model`'s LoRA adapters, in PEFT's format, atomically: `adapter_model.safetensors` +
    `adapter_config.json`, loadable by `load_adapters` onto the same base and by PEFT
    (`PeftModel.from_pretrained(base, folder)`) onto transformers' model of the same checkpoint.

    The tensors keep the adapters' dtype. `base_model_name_or_path` is recorded for PEFT's `AutoPeftModel*`.
    Layers and projections without an adapter are left out; a model without adapters is refused.
    """
    folder = os.fspath(folder)
    try:
        weights = lora_weights(model)
    except ValueError as e:
        raise AdapterError(f"{folder}: {e}") from None
    if not weights:
        raise AdapterError(f"{folder}: the model holds no LoRA adapters (g4.surgery.add_lora or g4.load_adapters "
                           "put them in); nothing to save")
    config = adapter_config(weights, base_model_name_or_path=base_model_name_or_path)
    tensors: list[tuple[str, np.ndarray]] = []
    for (layer, projection), w in sorted(weights.items()):
        name = PEFT_PREFIX + module_path(layer, projection)
        tensors.append((f"{name}.lora_A.weight", np.ascontiguousarray(np.asarray(w.a).T)))
        tensors.append((f"{name}.lora_B.weight", np.ascontiguousarray(np.asarray(w.b).T)))
    tensors.sort(key=lambda t: t[0])
    for name, t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise AdapterError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
    _check_target(os.path.realpath(folder))

    def write(staging: str) -> None:
        layout = [(name, DTYPE_NAMES[t.dtype], t.shape) for name, t in tensors]
        write_file(os.path.join(staging, ADAPTER_WEIGHTS), layout, iter(tensors), {"format": "pt"}, fsync=True)
        write_json(os.path.join(staging, ADAPTER_CONFIG), config)

    # replace_folder refuses, unless told `overwrite`, to drop weights it does not know as a model's own: here the old
    # adapter_model.safetensors, once `_check_target` has made sure nothing else would go
    replace_folder(folder, write, overwrite=True)
