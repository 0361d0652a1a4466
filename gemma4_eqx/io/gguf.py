"""GGUF files (llama.cpp's format, Google's QAT `gemma-4-12B-it-qat-q4_0-gguf`) read into the quantized layout.

Needs the `gguf` package (`pip install gemma4-eqx[gguf]`).

Names: our (transformers') text tensor names map to the `gemma4` architecture's names in `gguf.constants`
(`MODEL_TENSORS[MODEL_ARCH.GEMMA4]`, formatted by `TENSOR_NAMES`), as llama.cpp's converter maps them
(`Gemma4Model` in llama.cpp's HF-to-GGUF conversion code, `conversion/gemma.py`): the norm weights are written
as they are (`norm_shift` 0, unlike Gemma 3's `w + 1`), `layer_scalar` becomes `blk.N.layer_output_scale.weight`,
linear weights keep PyTorch's `[out, in]` (GGUF lists the dimensions innermost first, `[in, out]`), and the
converter adds a `rope_freqs` tensor derived from the config (read and ignored here: our RoPE computes it).
The vision and audio embedders of the Unified model have no GGUF names (`unsupported_tensors`): llama.cpp's
multimodal projector file (mmproj) is written for Gemma 4's vision/audio *towers*, which this model does not have.

Q4_0 (`gguf.GGMLQuantizationType.Q4_0`): blocks of 32 weights along the input axis, 18 bytes each: an fp16 scale
`d`, then 16 bytes whose low nibbles are weights 0..15 and high nibbles weights 16..31, each `d * (nibble - 8)`.
`q4_0_codes` reads the blocks as integer codes in [-8, 7] and the fp16 scales without forming any float weight;
the model holds them as `quant.QuantLinear` (int4, group 32, fp16 scales), whose dequantization `q * d` in fp32
equals `gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

import os
import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..config import Gemma4Config
from ..model.gemma4 import Gemma4
from ..quant.modules import quantize
from ..utils.files import FileReadError, open_regular
from ..utils.trees import follow
from .names import TEXT_PREFIX, CheckpointError, tensor_specs
from .quantized import LeafFiller, entries
from .reader import all_finite, nonfinite_error

_LAYER = {  # our per-layer suffix -> gguf MODEL_TENSOR member name
    "input_layernorm.weight": "ATTN_NORM",
    "post_attention_layernorm.weight": "ATTN_POST_NORM",
    "pre_feedforward_layernorm.weight": "FFN_PRE_NORM",
    "post_feedforward_layernorm.weight": "FFN_POST_NORM",
    "layer_scalar": "LAYER_OUT_SCALE",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "self_attn.q_norm.weight": "ATTN_Q_NORM",
    "self_attn.k_norm.weight": "ATTN_K_NORM",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
}
_GLOBAL = {"embed_tokens.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM"}
_LAYER_RE = re.compile(re.escape(TEXT_PREFIX) + r"layers\.(\d+)\.(.+)$")
IGNORED = ("rope_freqs.weight",)  # derived from the config by the converter; our RoPE computes it


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("reading GGUF files needs the gguf package: pip install gemma4-eqx[gguf]") from e
    return gguf


def gguf_name(name: str) -> str | None:
    """The GGUF name of one of our (transformers') tensor names; None when GGUF has no name for it."""
    gguf = _gguf()
    c = gguf.constants
    allowed = set(c.MODEL_TENSORS[c.MODEL_ARCH.GEMMA4])
    m = _LAYER_RE.match(name)
    if m:
        member, bid = _LAYER.get(m.group(2)), int(m.group(1))
    elif name.startswith(TEXT_PREFIX):
        member, bid = _GLOBAL.get(name[len(TEXT_PREFIX):]), None
    else:
        return None
    if member is None:
        return None
    tensor = c.MODEL_TENSOR[member]
    if tensor not in allowed:
        raise CheckpointError(f"{name}: gguf.constants lists {member} outside the gemma4 architecture's tensors")
    return c.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def name_table(specs) -> tuple[dict[str, str], list[str]]:
    """(our name -> GGUF name for every tensor GGUF names, our names it does not) over `tensor_specs(model)`."""
    table, unsupported = {}, []
    for s in specs:
        g = gguf_name(s.name)
        if g is None:
            unsupported.append(s.name)
        else:
            table[s.name] = g
    if len(set(table.values())) != len(table):
        raise CheckpointError("the GGUF name table maps two tensors to one name")
    return table, unsupported


def unsupported_tensors(specs) -> list[str]:
    """Our tensors with no GGUF name (the Unified model's vision and audio embedders)."""
    return name_table(specs)[1]


def q4_0_codes(blocks: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 bytes of a `[rows, cols]` tensor (`shape` in PyTorch order) as int8 codes `[rows, cols]` in [-8, 7] and
    fp16 scales `[rows, cols // 32]`; no float weight is formed."""
    rows, cols = shape
    if cols % 32:
        raise CheckpointError(f"Q4_0 tensor of shape {shape}: {cols} columns are not a whole number of 32-blocks")
    b = np.ascontiguousarray(blocks, np.uint8).reshape(rows, cols // 32, 18)
    scales = b[..., :2].copy().view(np.float16)[..., 0]
    qs = b[..., 2:]
    codes = np.empty((rows, cols // 32, 32), np.int8)
    codes[..., :16] = (qs & 0x0F).astype(np.int8) - 8
    codes[..., 16:] = (qs >> 4).astype(np.int8) - 8
    return codes.reshape(rows, cols), scales


def _tensor_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order (GGUF lists the innermost dimension first)."""
    return tuple(int(x) for x in reversed(list(t.shape)))


def _read_gguf(path: str):
    """(reader, tensors by name) of the GGUF file at `path`: a regular file only (a FIFO or device is refused,
    never read), memory-mapped from that one descriptor; any malformed content is a CheckpointError naming the
    file, not an index or reshape error from inside the gguf package."""
    gguf = _gguf()
    try:
        f = open_regular(path, "a GGUF file")
    except FileReadError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(str(e)) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(f"{path}: an empty file; expected a GGUF file")
        try:
            reader = gguf.GGUFReader(f)
            tensors = {}
            for t in reader.tensors:
                tensors[t.name] = t
        except Exception as e:  # ValueError, IndexError, KeyError, OverflowError, ... from a malformed file
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
    return reader, tensors


def _tensor_data(t, path: str, gname: str) -> np.ndarray:
    try:
        return np.asarray(t.data)
    except Exception as e:
        raise CheckpointError(f"{path}: {gname}: its data cannot be read ({type(e).__name__}: {e})") from None


def load_gguf(path: str | os.PathLike, config: Any, *, dtype: Any = jnp.bfloat16, model_kwargs: dict | None = None,
              check_finite: bool = True):
    """A text model from a GGUF file: Q4_0 projections as int4 `QuantLinear`s (group 32, fp16 scales, the codes as
    stored); F32 / F16 / BF16 tensors cast to `dtype`; the token embedding kept quantized when it is Q4_0, else
    read as float (other GGML types of non-projection tensors are dequantized with `gguf.quants.dequantize`).

    `config`: a `Gemma4Config` or a folder / config.json (the GGUF metadata is not turned into a config). The
    model's vision and audio embedders are not in the text GGUF (see `unsupported_tensors`); build the model from a
    config without them, or fill them from the safetensors checkpoint.

    Every tensor is checked before the model is built: its shape against the config's (a transposed or reshaped
    tensor is refused, naming it), and, with `check_finite`, its values (float tensors) or its Q4_0 block scales
    finite. Errors are `CheckpointError`s naming the file and the tensor.
    """
    gguf = _gguf()

    path = os.fspath(path)
    if not isinstance(config, Gemma4Config):
        config = Gemma4Config.from_pretrained(config)
    _, tensors = _read_gguf(path)
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    kw = model_kwargs or {}
    fabstract = eqx.filter_eval_shape(lambda: Gemma4(config, key=jax.random.key(0), dtype=dtype, **kw))
    specs = tensor_specs(fabstract)
    table, unsupported = name_table(specs)
    if unsupported:
        raise CheckpointError(f"{unsupported[0]}: has no GGUF name (and {len(unsupported) - 1} more); the text GGUF "
                              "holds the language model only: pass a config without vision_config/audio_config")
    missing = sorted(g for g in table.values() if g not in tensors)
    if missing:
        raise CheckpointError(f"{path}: {missing[0]} is missing from the GGUF file (and {len(missing) - 1} more)")
    extra = sorted(set(tensors) - set(table.values()) - set(IGNORED))
    if extra:
        raise CheckpointError(f"{path}: {extra[0]}: a tensor this model has no parameter for")
    for s in specs:  # every shape before anything is read: a transposed or reshaped tensor is no silent reshape
        t = tensors[table[s.name]]
        found = _tensor_shape(t)
        if found != tuple(s.shape):
            raise CheckpointError(f"{path}: {table[s.name]} ({s.name}): expected shape {tuple(s.shape)} (GGUF dims "
                                  f"{list(reversed(s.shape))}), found {found} (GGUF dims {[int(x) for x in t.shape]})")
    embed = tensors[table[TEXT_PREFIX + "embed_tokens.weight"]]
    projections = [s for s in specs if s.transpose and s.name.startswith(TEXT_PREFIX)]
    for s in projections:
        t = tensors[table[s.name]]
        if t.tensor_type != Q4_0:
            raise CheckpointError(f"{table[s.name]} ({s.name}): expected Q4_0, found {t.tensor_type.name}; only Q4_0 "
                                  "projections are read into the int4 layout")
    qabstract = eqx.filter_eval_shape(
        lambda m: quantize(m, "int4", group_size=32, scale_dtype=jnp.float16,
                           embedding=embed.tensor_type == Q4_0), fabstract)
    filler = LeafFiller(qabstract)
    put = filler.put
    for e in entries(qabstract, fabstract, specs):
        s = e.source
        gname = table[s.name]
        t = tensors[gname]
        if e.part == "scales":
            continue  # written with its codes
        if e.part == "qweight":
            if t.tensor_type != Q4_0:
                raise CheckpointError(f"{path}: {gname} ({s.name}): expected Q4_0, found {t.tensor_type.name}")
            try:
                codes, scales = q4_0_codes(_tensor_data(t, path, gname), s.shape)
            except ValueError as err:
                raise CheckpointError(f"{path}: {gname} ({s.name}): its Q4_0 blocks do not fill shape "
                                      f"{tuple(s.shape)} ({err})") from None
            if check_finite and not all_finite(scales):
                raise nonfinite_error(scales, f"{gname} ({s.name})", path, extra=" among its Q4_0 block scales")
            if e.module == "linear":
                codes, scales = codes.T, scales.T
            put(e.target, s.index, np.ascontiguousarray(codes).astype(ml_dtypes.int4))
            put(e.target[:-1] + (jax.tree_util.GetAttrKey("scales"),), s.index, np.ascontiguousarray(scales))
            continue
        data = _tensor_data(t, path, gname)
        try:
            if t.tensor_type not in floats:
                data = gguf.quants.dequantize(data, t.tensor_type)
            data = data.reshape(s.shape)
        except Exception as err:
            raise CheckpointError(f"{path}: {gname} ({s.name}): cannot be read as {t.tensor_type.name} of shape "
                                  f"{tuple(s.shape)} ({type(err).__name__}: {err})") from None
        leaf = follow(qabstract, e.target)
        piece = np.ascontiguousarray(data.T if s.transpose else data).astype(leaf.dtype)
        if check_finite and not all_finite(piece):
            raise nonfinite_error(piece.T if s.transpose else piece, f"{gname} ({s.name})", path,
                                  np.asarray(data) if np.dtype(leaf.dtype) != data.dtype else None)
        put(e.target, s.index, piece)
    return filler.model()


__all__ = ["IGNORED", "gguf_name", "load_gguf", "name_table", "q4_0_codes", "unsupported_tensors"]
