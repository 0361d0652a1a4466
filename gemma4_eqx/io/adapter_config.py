"""`adapter_config.json` as PEFT (0.21.2) reads it: `PeftLoraConfig` checks every field, refuses what plain LoRA
cannot honour (naming the field and value), and resolves each module's rank, alpha and scaling by PEFT's rules
(`io.adapters` has the whole format and reads and writes adapter folders with it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..config.fields import is_int, short
from .names import ADAPTER_CONFIG, CheckpointError

PEFT_VERSION = "0.21.2"  # the PEFT whose format and rules this module follows (tests/fixtures/peft)
OUTPUT_LAYER = "lm_head"  # tied to the embedding; "all-linear" leaves it out, as PEFT does
ALL_LINEAR = "all-linear"


class AdapterError(CheckpointError):
    """An adapter folder that cannot be read or written faithfully (names the file, field or tensor and value)."""


# ---- adapter_config.json -------------------------------------------------------------------------
# Fields that change nothing here (informational, or only acted on in training or for modules missing from the file,
# which are refused), and the fields read below.
INFORMATIONAL = frozenset({
    "auto_mapping", "base_model_name_or_path", "inference_mode", "lora_dropout", "megatron_core", "peft_version",
    "qalora_group_size", "revision", "runtime_config", "ensure_weight_tying", "eva_config", "velora_config",
})
READ = frozenset({"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                  "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights"})
# field -> (accepted values, what setting it does that plain LoRA cannot honour)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA adds a magnitude vector and another formula"),
    "fan_in_fan_out": ((False, None), "the base weight is stored transposed (GPT-2 style Conv1D); Gemma 4 has none"),
    "bias": (("none", None), "bias terms are trained beside the adapters"),
    "lora_bias": ((False, None), "lora_B carries a bias"),
    "modules_to_save": ((None, []), "whole modules are replaced by trained copies"),
    "trainable_token_indices": ((None, [], {}), "rows of the token embedding are trained"),
    "layer_replication": ((None, []), "layers are duplicated"),
    "target_parameters": ((None, []), "parameters (not modules) are adapted"),
    "alora_invocation_tokens": ((None, []), "activated LoRA applies only after its invocation tokens"),
    "use_bdlora": ((None, False, {}), "BD-LoRA uses block-diagonal factors"),
    "use_qalora": ((False, None), "QA-LoRA pools the inputs of a quantized base"),
    "megatron_config": ((None, {}), "Megatron parallel layers"),
    "loftq_config": ((None, {}), "LoftQ quantizes the base weights"),
    "corda_config": ((None, {}), "CorDA rewrites the base weights"),
    "lora_ga_config": ((None, {}), "LoRA-GA rewrites the base weights"),
    "kasa_config": ((None, {}), "KaSA truncates the base weight and adds singular values between A and B"),
    "monteclora_config": ((None, {}), "MonteCLoRA samples the adapters"),
    "arrow_config": ((None, {}), "Arrow routes between adapters"),
}
TASK_TYPES = (None, "CAUSAL_LM")
# init_lora_weights values after which PEFT's base model differs from the checkpoint (residual weights)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "kasa")


def _equal(value: Any, accepted: tuple[Any, ...]) -> bool:
    return any(type(value) is type(a) and value == a for a in accepted)


def _fail(where: str, field: str, value: Any, expected: str) -> None:
    raise AdapterError(f"{where}: {field} = {short(value, 120)}: expected {expected}")


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _str_or_list(where: str, field: str, value: Any, *, allow_none: bool) -> str | list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    _fail(where, field, value, "a regular expression (string) or a non-empty list of module names"
          + (", or null" if allow_none else ""))


def _regex(where: str, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{where}: {field}: {short(pattern, 120)} is not a regular expression ({e})") from None


class PeftLoraConfig:
    """The parts of a PEFT `LoraConfig` (as `adapter_config.json` holds it) that decide what is adapted and how,
    checked field by field; `targets(path)`, `rank(path)` and `scaling(path)` follow PEFT 0.21.2."""

    def __init__(self, d: Mapping[str, Any], where: str = ADAPTER_CONFIG):
        self.where = where
        if not isinstance(d, Mapping):
            raise AdapterError(f"{where}: expected a JSON object, found {type(d).__name__}")
        if d.get("peft_type") != "LORA":
            _fail(where, "peft_type", d.get("peft_type", "<missing>"),
                  "'LORA' (this package reads and writes plain LoRA adapters only)")
        for field, (accepted, why) in REFUSED.items():
            if field in d and not _equal(d[field], accepted):
                raise AdapterError(f"{where}: {field} = {short(d[field], 120)}: {why}, which plain LoRA cannot honour "
                                   f"(accepted: {' or '.join(map(repr, accepted))})")
        for field, value in d.items():
            if field not in READ | INFORMATIONAL | set(REFUSED) and value not in (None, False, {}, [], ""):
                raise AdapterError(f"{where}: {field} = {short(value, 120)}: a field this reader does not know (it "
                                   f"follows PEFT {PEFT_VERSION}); it may change what the adapter computes")
        if d.get("task_type") not in TASK_TYPES:
            _fail(where, "task_type", d["task_type"], f"one of {TASK_TYPES} (other tasks add heads to the model)")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            raise AdapterError(f"{where}: init_lora_weights = {init!r}: this initialisation rewrites the base "
                               "weights (residual weights the adapter file does not carry); convert the adapter to "
                               "plain LoRA in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        self.r = d.get("r", 8)
        if not is_int(self.r) or self.r <= 0:
            _fail(where, "r", self.r, "a positive integer")
        self.alpha = d.get("lora_alpha", 8)
        if not _is_number(self.alpha):
            _fail(where, "lora_alpha", self.alpha, "a finite number")
        self.rslora = d.get("use_rslora", False)
        if not isinstance(self.rslora, bool):
            _fail(where, "use_rslora", self.rslora, "true or false")
        self.target_modules = _str_or_list(where, "target_modules", d.get("target_modules"), allow_none=False)
        self.exclude_modules = _str_or_list(where, "exclude_modules", d.get("exclude_modules"), allow_none=True)
        for field in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, field), str):
                _regex(where, field, getattr(self, field))
        self.layers = d.get("layers_to_transform")
        if self.layers == []:
            self.layers = None
        if not (self.layers is None or is_int(self.layers)
                or (isinstance(self.layers, list) and all(is_int(i) for i in self.layers))):
            _fail(where, "layers_to_transform", self.layers, "null, a layer index or a list of layer indices")
        self.layers_pattern = d.get("layers_pattern")
        if self.layers_pattern in ([], ""):
            self.layers_pattern = None
        if not (self.layers_pattern is None or isinstance(self.layers_pattern, str)
                or (isinstance(self.layers_pattern, list) and all(isinstance(p, str) for p in self.layers_pattern))):
            _fail(where, "layers_pattern", self.layers_pattern, "null, a string or a list of strings")
        if isinstance(self.target_modules, str) and (self.layers is not None or self.layers_pattern is not None):
            raise AdapterError(f"{where}: layers_to_transform / layers_pattern = {short(self.layers, 120)} / "
                               f"{short(self.layers_pattern, 120)} with a regular expression as target_modules; PEFT "
                               "refuses this combination (the expression alone selects the layers)")
        if self.layers_pattern is not None and self.layers is None:
            _fail(where, "layers_pattern", self.layers_pattern, "null when layers_to_transform is null (PEFT's rule)")
        self.rank_pattern = self._pattern(d, "rank_pattern", lambda v: is_int(v) and v > 0, "a positive integer")
        self.alpha_pattern = self._pattern(d, "alpha_pattern", _is_number, "a finite number")

    def _pattern(self, d: Mapping[str, Any], field: str, ok, what: str) -> dict[str, Any]:
        table = d.get(field) or {}
        if not isinstance(table, dict):
            _fail(self.where, field, table, "an object of module-name patterns")
        for key, value in table.items():
            _regex(self.where, f"{field} key", key)
            if not ok(value):
                _fail(self.where, f"{field}[{key!r}]", value, what)
        return table

    def targets(self, path: str) -> bool:
        """Whether PEFT wraps the module at `path` (tuners_utils.check_target_module_exists)."""
        ex = self.exclude_modules
        if ex is not None:
            if isinstance(ex, str):
                if re.fullmatch(ex, path):
                    return False
            elif path in ex or any(path.endswith(f".{e}") for e in ex):
                return False
        t = self.target_modules
        if isinstance(t, str):
            if t.lower() == ALL_LINEAR:
                return path != OUTPUT_LAYER
            return re.fullmatch(t, path) is not None
        if path in t:
            return True
        if not any(path.endswith(f".{e}") for e in t):
            return False
        if self.layers is None:
            return True
        if self.layers_pattern is None:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            m = None
            for p in patterns:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path)
                if m is not None:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == self.layers if is_int(self.layers) else idx in self.layers

    @staticmethod
    def _lookup(table: Mapping[str, Any], path: str, default: Any) -> Any:
        for key, value in table.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    def rank(self, path: str) -> int:
        return self._lookup(self.rank_pattern, path, self.r)

    def scaling(self, path: str) -> float:
        r, alpha = self.rank(path), self._lookup(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r
