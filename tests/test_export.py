"""Export to transformers: a checkpoint written by `g4.save` (from a sharded model) runs the same in transformers.

`scripts/record_hf_export.py` wrote `tests/fixtures/export/checkpoint/` with `g4.save` from a model sharded over
8 devices, loaded it with `Gemma4UnifiedForConditionalGeneration.from_pretrained` (no missing, unexpected or
mismatched tensor) and recorded transformers' logits in `logits.npz`. Here the same files are loaded with
`g4.load` and run.
"""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import gemma4_eqx as g4

EXPORT = pathlib.Path(__file__).parent / "fixtures" / "export"
TOKEN_FIELDS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "positions",
                "mm_token_type_ids": "mm_token_type_ids"}
MEDIA_FIELDS = ("pixel_values", "image_position_ids", "input_features", "input_features_mask")


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, np.ndarray]]:
    data = np.load(EXPORT / "logits.npz")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        case, field = key.split("/", 1)
        out.setdefault(case, {})[field] = data[key]
    return out


@pytest.fixture(scope="module")
def model():
    return g4.load(EXPORT / "checkpoint")


def _ours(model, case: dict) -> np.ndarray:
    tokens = {ours: jnp.asarray(case[hf]) for hf, ours in TOKEN_FIELDS.items() if hf in case}
    tokens["attention_mask"] = jnp.asarray(case["attention_mask"].astype(bool))
    media = {k: jnp.asarray(case[k][None]) for k in MEDIA_FIELDS if k in case}  # the media of the one row
    assert not media or tokens["input_ids"].shape[0] == 1
    return np.asarray(_forward(model, {**tokens, **media}))


# transformers' plain forward builds its masks the "hf_forward" way (spec §5.4). The model is an argument of the
# compiled function, not constants baked into it.
_forward = eqx.filter_jit(lambda model, batch: jax.vmap(lambda b: model(**b, mask_mode="hf_forward"))(batch))


def test_transformers_loaded_every_tensor(recorded):
    meta = json.loads(str(recorded["_info"]["meta"]))
    assert all(not v for v in meta["loading_info"].values()), meta["loading_info"]


def test_export_is_sharded_with_an_index():
    files = sorted(p.name for p in (EXPORT / "checkpoint").iterdir())
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1


@pytest.mark.parametrize("case", ["text_long", "left_pad", "mm_mixed"])
def test_logits_equal_transformers_on_the_exported_checkpoint(model, recorded, case):
    c = recorded[case]
    ours = _ours(model, c)
    valid = c["attention_mask"].astype(bool)  # padded query rows are garbage in both
    diff = np.abs(ours - c["logits"])[valid].max()
    assert diff <= 1e-4, f"{case}: max |ours - transformers| = {diff}"


def test_resaving_the_export_is_bit_exact(model, tmp_path):
    g4.save(model, tmp_path, max_shard_size="1MB")
    index = json.loads((EXPORT / "checkpoint" / "model.safetensors.index.json").read_text())
    again = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == again["weight_map"]
    for file in sorted(set(index["weight_map"].values())):
        a, b = load_file(str(EXPORT / "checkpoint" / file)), load_file(str(tmp_path / file))
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
