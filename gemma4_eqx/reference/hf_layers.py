"""transformers' per-layer hidden states of a Gemma 4 checkpoint, for `gemma4-eqx verify --against-transformers`.

Run by `gemma4-eqx verify` with a Python that has torch and transformers (it imports nothing from gemma4_eqx, so
it runs in any environment that has them, e.g. a Python 3.11 venv):

    PYTHON hf_layers.py --model FOLDER --inputs IN.npz --out OUT.npz

IN.npz: one sequence as a batch of one, transformers' names and layout (`input_ids`, `attention_mask`,
`position_ids`, `mm_token_type_ids` [1, seq]; `pixel_values` [images, patches, patch_dim] and
`image_position_ids` [images, patches, 2] when the prompt holds an image).

The checkpoint is loaded with `Gemma4UnifiedForConditionalGeneration.from_pretrained(FOLDER, dtype=float32,
attn_implementation="eager")` (local files only) and run once with `output_hidden_states=True` and the masks of
its `create_masks_for_generate` (what `generate()` uses; gemma4-eqx's default `mask_mode="intended"`).
transformers' `hidden_states` are the embeddings (after the multimodal splice), the outputs of layers 0 .. n-2,
and the final norm's output in place of the last layer's; a forward hook on the last layer adds its raw output.

OUT.npz: `embeddings`, `layer.<i>` (i = 0 .. n-1), `final_norm` ([seq, hidden] each), `logits` ([seq, vocab]),
all float32, and `meta` (0-d JSON: versions, layer types).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import transformers
    from transformers.models.gemma4_unified import modeling_gemma4_unified as mg

    model_class = mg.Gemma4UnifiedForConditionalGeneration
    model = model_class.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager",
                                        local_files_only=True).eval()
    data = np.load(args.inputs)
    inputs = {}
    for k in data.files:
        v = data[k]
        if k == "attention_mask" or v.dtype.kind in "iu":
            inputs[k] = torch.from_numpy(v.astype(np.int64))
        elif v.dtype == np.bool_:
            inputs[k] = torch.from_numpy(v)
        else:
            inputs[k] = torch.from_numpy(v.astype(np.float32))

    cfg = model.config
    ids = inputs["input_ids"]
    placeholder = (ids == cfg.image_token_id) | (ids == cfg.video_token_id) | (ids == cfg.audio_token_id)
    with torch.no_grad():
        # the mask builder reads only the shape, dtype and device of the embeddings
        embeds = model.get_input_embeddings()(torch.where(placeholder, cfg.text_config.pad_token_id, ids))
        masks = model_class.create_masks_for_generate(
            config=cfg, inputs_embeds=embeds, attention_mask=inputs["attention_mask"], cache=None,
            position_ids=inputs["position_ids"], mm_token_type_ids=inputs.get("mm_token_type_ids"))
    layers = model.model.language_model.layers
    last = {}
    hook = layers[-1].register_forward_hook(
        lambda module, args, output: last.__setitem__("out", output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        out = model(**{**inputs, "attention_mask": masks}, output_hidden_states=True, use_cache=False)
    hook.remove()
    hidden = out.hidden_states
    n = len(layers)
    if len(hidden) != n + 1:
        raise SystemExit(f"hf_layers: expected {n + 1} hidden states from transformers, found {len(hidden)}")
    arrays = {"embeddings": hidden[0]}
    arrays.update({f"layer.{i}": hidden[i + 1] for i in range(n - 1)})
    arrays[f"layer.{n - 1}"] = last["out"]
    arrays["final_norm"] = hidden[n]
    arrays["logits"] = out.logits
    arrays = {k: v[0].detach().to(torch.float32).numpy() for k, v in arrays.items()}
    arrays["meta"] = np.array(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                          "layer_types": list(cfg.text_config.layer_types),
                                          "python": sys.version.split()[0]}))
    np.savez(args.out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
