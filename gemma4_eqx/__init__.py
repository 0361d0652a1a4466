"""gemma4-eqx: Gemma 4 12B Unified in JAX/Equinox."""

# GEMMA4_EQX_TYPECHECK=1: shape-check every annotated function (jaxtyping + beartype). The hook must be in place
# before any submodule is imported, so this comes first (see gemma4_eqx/typecheck.py).
from . import typecheck

if typecheck.requested():
    typecheck.install()

from .config import AudioConfig, ConfigError, Gemma4Config, TextConfig, VisionConfig, small_config
from .checkpoint import CheckpointError
from .hub import load, save
from .cache import KVCache
from .chat import ChatSession, Reply
from .generation import GenerationResult, generate
from .assistant import Assistant, AssistantConfig, load_assistant, save_assistant
from .speculative import PromptLookupDrafter
from .generation_config import GenerationConfig
from .fuse import serving_layout
from .layers.policy import (XLA, AutoKernel, CuDNNKernel, Invariant, PolicyError, Remat, TorchCPU, XLAKernel,
                            with_policy)
from .media import Media
from .model import Gemma4, count_parameters
from . import quant
from .quant import quantize
from .processing import Processor
from .scoring import ScoreResult, score
from .taps import TapResult, Taps
from . import assets, batching

__all__ = ["Assistant", "AssistantConfig", "AudioConfig", "AutoKernel", "ChatSession", "CheckpointError",
           "ConfigError", "CuDNNKernel", "Gemma4", "Gemma4Config", "GenerationConfig", "GenerationResult", "Invariant",
           "KVCache", "Media", "PolicyError", "Processor", "PromptLookupDrafter", "Remat", "Reply", "ScoreResult",
           "TapResult", "Taps", "TextConfig", "TorchCPU", "VisionConfig", "XLA", "XLAKernel", "batching", "bridge",
           "count_parameters", "generate", "load", "load_assistant", "losses", "nnx", "quant", "quantize", "save",
           "save_assistant", "score", "serving_layout", "sharding", "small_config", "surgery", "taps", "train",
           "typecheck", "with_policy"]
__version__ = "0.1.0"


def __getattr__(name):
    # The NNX reference and the bridge import flax: load them on first use only.
    if name in ("bridge", "losses", "nnx", "sharding", "surgery", "train"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gemma4_eqx' has no attribute {name!r}")
