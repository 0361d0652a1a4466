"""Quantized weights: the format (`QuantConfig`, int8 per output channel and int4 in groups, `format`), the
modules that hold them (`QuantLinear`, `QuantEmbedding`) and the whole-model transforms (`quantize`,
`dequantize_model`) with their memory arithmetic (`modules`). It sits on `model`; reading and writing quantized
folders is `io.quantized`."""

from .format import QMAX, QuantConfig, QuantError, as_quant_config, dequantize, pack_int4, quantize_array, unpack_int4
from .modules import (
                     GROUPED_MAX_ROWS,
                     QuantEmbedding,
                     QuantLinear,
                     decoder_linears,
                     dequantize_model,
                     is_quantized,
                     quant_config_of,
                     quantize,
                     sharding_rules,
                     weight_bytes,
                     weight_memory,
)

__all__ = ["GROUPED_MAX_ROWS", "QMAX", "QuantConfig", "QuantEmbedding", "QuantError", "QuantLinear",
           "as_quant_config", "decoder_linears", "dequantize", "dequantize_model", "is_quantized", "pack_int4",
           "quant_config_of", "quantize", "quantize_array", "sharding_rules", "unpack_int4", "weight_bytes",
           "weight_memory"]
