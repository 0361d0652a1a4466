"""Configuration: the model's `config.json` (`Gemma4Config`: `text.py`, `media.py`, `gemma4.py`), the assistant's
(`assistant.py`) and `generation_config.json` (`generation.py`), read as strictly as transformers reads them.

The lowest layer above `utils`: nothing here imports JAX models, I/O or generation.
"""

from .assistant import AssistantConfig
from .fields import ConfigError
from .gemma4 import Gemma4Config, small_config
from .generation import GenerationConfig
from .media import AudioConfig, VisionConfig
from .text import FULL, LAYER_TYPES, SLIDING, LayerGeometry, RopeConfig, TextConfig

__all__ = ["AssistantConfig", "FULL", "LAYER_TYPES", "SLIDING", "AudioConfig", "ConfigError", "Gemma4Config",
           "GenerationConfig", "LayerGeometry", "RopeConfig", "TextConfig", "VisionConfig", "small_config"]
