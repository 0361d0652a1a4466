"""Generation on top of the model: sampling, batching, the compiled decode loop, speculative decoding on that loop,
the `generate` entry, chat sessions, scoring and streaming."""
