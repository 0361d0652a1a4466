"""Record transformers' logits on the bundled small checkpoint, for `gemma4-eqx verify`.

Run in the transformers venv (see DEVELOPERS.md):
    .venv-hf/bin/python scripts/record_bundled_reference.py
Writes gemma4_eqx/assets/tiny/hf_reference.npz: a text batch with left padding and an image prompt, with the
inputs exactly as passed and transformers' fp32 logits of its bare forward() (the `hf_forward` mask mode).
"""

import json
import pathlib

import numpy as np
import torch
from transformers import Gemma4UnifiedForConditionalGeneration

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "gemma4_eqx" / "assets" / "tiny"


def main() -> None:
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(str(FOLDER), attn_implementation="eager",
                                                                  dtype=torch.float32).eval()
    cfg = model.config
    rng = np.random.default_rng(20261128)
    vocab = cfg.text_config.vocab_size
    # text: two rows, the second left-padded; positions as generate() builds them
    ids = rng.integers(3, vocab - 8, size=(2, 40)).astype(np.int64)
    ids[:, 0] = 2
    mask = np.ones_like(ids, dtype=bool)
    mask[1, :7] = False
    ids[1, :7] = 0
    ids[1, 7] = 2
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    # image: a 3x4 grid of 48-px patches padded to 16, inside a prompt
    n, pad = 12, 16
    pixels = np.zeros((1, pad, 48 * 48 * 3), np.float32)
    pixels[0, :n] = rng.integers(0, 256, size=(n, 48 * 48 * 3)) / 255.0
    pos = np.full((1, pad, 2), -1, np.int64)
    pos[0, :n, 0] = np.arange(n) % 4
    pos[0, :n, 1] = np.arange(n) // 4
    text = list(rng.integers(3, vocab - 8, size=6))
    image_ids = np.array([[2, *text[:3], cfg.boi_token_id, *([cfg.image_token_id] * n), cfg.eoi_token_id, *text[3:]]])
    types = (image_ids == cfg.image_token_id).astype(np.int64)
    out = {}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                       position_ids=torch.tensor(positions)).logits
        out.update({"text/input_ids": ids.astype(np.int32), "text/attention_mask": mask,
                    "text/positions": positions.astype(np.int32), "text/logits": logits.numpy()})
        logits = model(input_ids=torch.tensor(image_ids), pixel_values=torch.tensor(pixels),
                       image_position_ids=torch.tensor(pos), mm_token_type_ids=torch.tensor(types)).logits
        out.update({"image/input_ids": image_ids.astype(np.int32), "image/mm_token_type_ids": types.astype(np.int32),
                    "image/pixel_values": pixels, "image/image_position_ids": pos.astype(np.int32),
                    "image/logits": logits.numpy()})
    import transformers
    out["meta"] = np.array(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                       "mask_mode": "hf_forward", "dtype": "float32"}))
    np.savez_compressed(FOLDER / "hf_reference.npz", **out)
    print(f"wrote {FOLDER / 'hf_reference.npz'}")


if __name__ == "__main__":
    main()
