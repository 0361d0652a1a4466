"""Build the small random checkpoint bundled in the package (gemma4_eqx/assets/tiny).

It is made by this project's own code: a config with the real structure (5 sliding + 1 full layers, keys as
values, proportional RoPE, a sliding window of 16) at toy sizes, random perturbed weights, saved with g4.save.
Its vocabulary matches the bundled test tokenizer (1024 entries, special ids by the project's small-vocab rule).
Run: .venv/bin/python scripts/make_bundled_checkpoint.py
"""

import json
import pathlib

import gemma4_eqx as g4
from gemma4_eqx.testing import random_model

OUT = pathlib.Path(__file__).resolve().parents[1] / "gemma4_eqx" / "assets" / "tiny"


def main() -> None:
    cfg = g4.small_config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                          sliding_window=16, mm_embed_dim=32, mm_posemb_size=64)
    cfg = cfg.replace(eos_token_id=(1, 106))
    model = random_model(cfg, seed=20261128)
    g4.save(model, OUT)
    generation = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50],
                  "suppress_tokens": [cfg.eoa_token_id, cfg.eoi_token_id],
                  "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    (OUT / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    print(f"wrote {OUT} ({g4.count_parameters(model):,} parameters)")


if __name__ == "__main__":
    main()
