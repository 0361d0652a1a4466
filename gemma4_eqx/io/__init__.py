"""Checkpoint I/O: safetensors, HF tensor names, streaming load, atomic save, quantized and assistant folders,
GGUF, the Hub. It sits on `model` and `quant`."""
