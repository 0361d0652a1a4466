"""Generation defaults: one source, the checkpoint's `generation_config.json` (as transformers reads it).

`g4.generate`, `g4.ChatSession` and the CLI take stop ids, suppressed ids, pad id, temperature, top-k and top-p
from a `GenerationConfig` whenever the caller does not give them. `g4.load` attaches nothing to the model (the
model is a pure pytree of weights), so the config is passed explicitly:

    gen = g4.GenerationConfig.from_pretrained(folder)      # reads folder/generation_config.json
    g4.generate(model, ids, generation_config=gen)          # or generation_config=folder

Without one, `GenerationConfig.from_model_config(model.config)` applies: the stop ids of `config.json`
(`eos_token_id`), no suppressed ids, and Gemma 4's published sampling settings (temperature 1, top-k 64,
top-p 0.95).
"""

from __future__ import annotations

import dataclasses
import os

from ..utils.files import FileMissingError
from .fields import ConfigError, fail, is_int, read_bool, read_config_file, read_float, read_int, short

GEMMA4_SAMPLING = dict(temperature=1.0, top_k=64, top_p=0.95)


def _ids(value, field: str = "eos_token_id") -> tuple[int, ...]:
    """None, one id or a list of ids, each a non-negative integer (3.7, true or "x" are refused, not rounded)."""
    if value is None:
        return ()
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(is_int(i) and i >= 0 for i in ids):
        fail(f"generation_config.{field}", f"expected a token id or a list of token ids (integers >= 0), found "
             f"{short(value)}")
    return tuple(ids)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    stop_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    temperature: float = GEMMA4_SAMPLING["temperature"]
    top_k: int | None = GEMMA4_SAMPLING["top_k"]
    top_p: float | None = GEMMA4_SAMPLING["top_p"]

    @classmethod
    def from_dict(cls, g: dict) -> "GenerationConfig":
        """transformers' field names: eos_token_id, suppress_tokens, pad_token_id, do_sample, temperature, ..."""
        p = "generation_config"
        if not isinstance(g, dict):
            fail(p, f"expected an object, found {short(g)}")
        out = dict(stop_ids=_ids(g.get("eos_token_id")), suppress_ids=_ids(g.get("suppress_tokens"), "suppress_tokens"),
                   pad_id=read_int(g, "pad_token_id", p, None, minimum=0, nullable=True))
        # types here; ranges (against the vocabulary) where the settings are used (`generate.settings`)
        if g.get("temperature") is not None:
            out["temperature"] = read_float(g, "temperature", p, positive=False)
        if g.get("top_k") is not None:
            out["top_k"] = read_int(g, "top_k", p, minimum=0)
        if g.get("top_p") is not None:
            out["top_p"] = read_float(g, "top_p", p, maximum=1.0)
        if read_bool(g, "do_sample", p, None) is False:  # transformers: greedy whatever the temperature says
            out["temperature"] = 0.0
        return cls(**out)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        """A checkpoint folder (its `generation_config.json`) or the file itself, read through `utils.files`
        (a regular file of at most 8 MiB; in a folder, its symlink rule): `ConfigError` naming the file otherwise."""
        path = os.fspath(path)
        try:
            g, file = read_config_file(path, ConfigError, name="generation_config.json")
        except FileNotFoundError:
            raise FileMissingError(f"generation_config: no generation_config.json at {path}") from None
        try:
            return cls.from_dict(g)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """What a checkpoint without generation_config.json gets: config.json's stop ids, Gemma 4's sampling."""
        stop = _ids(getattr(config, "eos_token_id", None)) or _ids(config.text.eos_token_id)
        return cls(stop_ids=stop, pad_id=config.text.pad_token_id)

    @classmethod
    def resolve(cls, value, model_config) -> "GenerationConfig":
        """`generation_config=` as given to generate: None, a GenerationConfig, a dict, a file or a checkpoint
        folder (one without generation_config.json gets `from_model_config`)."""
        if value is None:
            return cls.from_model_config(model_config)
        if isinstance(value, GenerationConfig):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            if os.path.isdir(value) and not os.path.isfile(os.path.join(value, "generation_config.json")):
                return cls.from_model_config(model_config)  # as transformers: a checkpoint without the file
            return cls.from_pretrained(value)
        raise TypeError(f"generation_config: expected a GenerationConfig, a dict or a path, found "
                        f"{type(value).__name__}")
