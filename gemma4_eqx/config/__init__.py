"""Configuration: the model's `config.json` (`Gemma4Config` and its parts) and `generation_config.json`.

The lowest layer above `utils`: nothing here imports JAX models, I/O or generation.
"""

from .assistant import AssistantConfig
from .fields import ConfigError
from .gemma4 import (
                     FULL,
                     LAYER_TYPES,
                     SLIDING,
                     AudioConfig,
                     Gemma4Config,
                     LayerGeometry,
                     RopeConfig,
                     TextConfig,
                     VisionConfig,
                     small_config,
)
from .generation import GenerationConfig

__all__ = ["AssistantConfig", "FULL", "LAYER_TYPES", "SLIDING", "AudioConfig", "ConfigError", "Gemma4Config", "GenerationConfig",
           "LayerGeometry", "RopeConfig", "TextConfig", "VisionConfig", "small_config"]
