"""The model: masks, media, embedders, the `Gemma4` module, its KV cache and cached path, taps, the assistant
network, the serving layout, surgery and sharding rules.

It sits on `config` and `layers`; it never imports quantization, checkpoint I/O, processing or generation.
"""
