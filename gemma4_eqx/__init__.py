"""gemma4-eqx: Gemma 4 12B Unified in JAX/Equinox.

The package is layered; each subpackage imports only from the ones before it (tests/test_layering.py checks it):

    utils -> config -> layers -> model -> quant -> io -> processing -> generate, train -> nnx, bridge, reference
    -> serve -> cli

`import gemma4_eqx as g4` gives the names users need; `g4.sharding`, `g4.losses`, `g4.surgery`, ... name the
modules that hold the rest.
"""

# GEMMA4_EQX_TYPECHECK=1: shape-check every annotated function (jaxtyping + beartype). The hook must be in place
# before any submodule is imported, so this comes first (see gemma4_eqx/typecheck.py).
from . import typecheck

if typecheck.requested():
    typecheck.install()

import importlib as _importlib

from . import assets
from .config import AssistantConfig, AudioConfig, ConfigError, Gemma4Config, GenerationConfig, TextConfig, VisionConfig, small_config
from .generate.chat import ChatSession, Reply
from .generate.generation import GenerationResult, generate
from .generate.scoring import ScoreResult, score
from .generate.streaming import TextStreamer
from .io.adapters import load_adapters, save_adapters
from .io.checkpoint import CheckpointError
from .io.hub import load, save
from .layers.policy import (XLA, AutoKernel, CuDNNKernel, Invariant, PolicyError, Remat, TorchCPU, XLAKernel,
                            with_policy)
from .io.assistant import load_assistant, save_assistant
from .model.assistant import Assistant
from .model.cache import KVCache
from .model.drafter import PromptLookupDrafter
from .model.gemma4 import Gemma4, count_parameters
from .model.media import Media
from .model.serving import serving_layout
from .model.taps import TapResult, Taps
from .processing import Processor
from .quant import quantize

__all__ = ["Assistant", "AssistantConfig", "AudioConfig", "AutoKernel", "ChatSession", "CheckpointError",
           "ConfigError", "CuDNNKernel", "Gemma4", "Gemma4Config", "GenerationConfig", "GenerationResult", "Invariant",
           "KVCache", "Media", "PolicyError", "Processor", "PromptLookupDrafter", "Remat", "Reply", "ScoreResult",
           "TapResult", "Taps", "TextConfig", "TextStreamer", "TorchCPU", "VisionConfig", "XLA", "XLAKernel",
           "adapters", "batching", "bridge", "count_parameters", "generate", "load", "load_adapters", "load_assistant",
           "losses", "nnx", "quant", "quantize", "save", "save_adapters", "save_assistant", "score", "serving_layout",
           "sharding", "small_config", "surgery", "taps", "train", "typecheck", "with_policy"]
__version__ = "0.1.0"

# Modules users reach as `g4.<name>` (their names from before the package was layered), imported on first use:
# bridge, nnx, losses, sharding, surgery and train import flax or optax-facing code that plain inference never needs.
MODULES = {
    "adapters": "io.adapters", "batching": "generate.batching", "bridge": "bridge", "cache": "model.cache",
    "checkpoint": "io.checkpoint", "cli": "cli", "decode": "model.decode", "gguf_io": "io.gguf", "hub": "io.hub",
    "layers": "layers", "losses": "train.losses", "masks": "model.masks", "nnx": "nnx", "processing": "processing",
    "quant": "quant", "reference": "reference", "sampling": "generate.sampling", "sharding": "model.sharding",
    "surgery": "io.surgery", "taps": "model.taps", "testing": "testing", "train": "train",
}


def __getattr__(name):
    if name in MODULES:
        module = _importlib.import_module(f".{MODULES[name]}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'gemma4_eqx' has no attribute {name!r}")
