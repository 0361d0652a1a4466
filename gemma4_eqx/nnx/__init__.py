"""The Flax NNX reference of Gemma 4 Unified: an independent, batched twin of the Equinox model.

    from gemma4_eqx import nnx as g4nnx
    ref = g4nnx.Gemma4NNX(cfg, rngs=flax.nnx.Rngs(0))
    ref = g4nnx.load(path_or_repo_id, dtype=jnp.float32)
    ref.logits(input_ids)          # [B, S] -> [B, S, V]
"""

from .checkpoint import disk_name, load, named_params, parameter_count, tensor_specs
from .masks import MASK_MODES
from .model import Gemma4NNX

__all__ = ["Gemma4NNX", "MASK_MODES", "disk_name", "load", "named_params", "parameter_count", "tensor_specs"]
