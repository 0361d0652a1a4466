"""transformers' reading of Gemma 4 Unified configs, as a line-oriented oracle (run with `.venv-hf`'s Python).

Each line on stdin is a JSON request `{"text_config": {...}, "folder": "..."}`: the keyword arguments a user would
give `Gemma4UnifiedTextConfig`. The oracle builds `Gemma4UnifiedConfig(text_config=...)` with transformers itself,
builds the text model from it on torch's meta device (so nothing is allocated, but every module is shaped),
`save_pretrained`s it into `folder`, reads the folder back with `Gemma4UnifiedConfig.from_pretrained` and answers
one JSON line describing what transformers made of the *reloaded* file, layer by layer:

    {"ok": true, "layers": [{"layer_type", "head_dim", "num_key_value_heads", "num_attention_heads",
                             "has_v_proj", "sliding_window"}, ...],
     "inv_freq": {"sliding_attention": [...], "full_attention": [...]},
     "tensors": {"layers.0.self_attn.q_proj.weight": [out, in], ...}}

`has_v_proj`, the head counts and the window are read off the built attention modules (not recomputed from the
config), `tensors` is the text model's state dict (names and shapes), the RoPE inverse frequencies come off
transformers' rotary embedding built on the CPU. A config transformers
refuses (at construction, model build, save or reload) answers `{"ok": false, "error": "..."}`.

Used by tests/test_config_transformers.py; the tests themselves never import torch.
"""

from __future__ import annotations

import json
import sys
import warnings


def describe(request: dict) -> dict:
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedTextConfig
    from transformers.models.gemma4_unified import modeling_gemma4_unified as modeling

    try:
        text = Gemma4UnifiedTextConfig(**request["text_config"])
        config = Gemma4UnifiedConfig(text_config=text)
        with torch.device("meta"):
            modeling.Gemma4UnifiedTextModel(config.text_config)
        config.save_pretrained(request["folder"])
        reloaded = Gemma4UnifiedConfig.from_pretrained(request["folder"]).text_config
        with torch.device("meta"):
            model = modeling.Gemma4UnifiedTextModel(reloaded)
        rotary = modeling.Gemma4UnifiedTextRotaryEmbedding(reloaded, device="cpu")
    except Exception as e:  # noqa: BLE001 - any refusal is an answer
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    layers = []
    for layer in model.layers:
        attn = layer.self_attn
        layers.append({
            "layer_type": attn.layer_type,
            "head_dim": attn.head_dim,
            "num_key_value_heads": attn.k_proj.out_features // attn.head_dim,
            "num_attention_heads": attn.q_proj.out_features // attn.head_dim,
            "has_v_proj": attn.v_proj is not None,
            "sliding_window": attn.sliding_window,
        })
    inv_freq = {t: getattr(rotary, f"{t}_inv_freq").to(torch.float32).tolist() for t in sorted(set(reloaded.layer_types))}
    tensors = {name: list(t.shape) for name, t in model.state_dict().items()}
    return {"ok": True, "layers": layers, "inv_freq": inv_freq, "tensors": tensors}


def main() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    print(json.dumps({"ready": transformers.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(describe(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
