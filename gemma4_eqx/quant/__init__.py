"""Quantized weights: int8 per output channel and int4 in groups (`quantize`, `QuantLinear`, `QuantEmbedding`),
their config and memory arithmetic. It sits on `model`; reading and writing quantized folders is `io.quantized`."""

from .modules import (QuantConfig, QuantEmbedding, QuantError, QuantLinear, dequantize, dequantize_model,
                      is_quantized, quant_config_of, quantize, quantize_array, sharding_rules, weight_bytes,
                      weight_memory)

__all__ = ["QuantConfig", "QuantEmbedding", "QuantError", "QuantLinear", "dequantize", "dequantize_model",
           "is_quantized", "quant_config_of", "quantize", "quantize_array", "sharding_rules", "weight_bytes",
           "weight_memory"]
