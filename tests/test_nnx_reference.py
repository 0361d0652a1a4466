"""The NNX reference against the Equinox model (and against recorded transformers outputs).

One random checkpoint is written with `g4.save` and loaded both ways. Equinox runs one sequence at a time
(vmapped over the batch, each sample with its own media); NNX runs the batch with the media of the whole batch
stacked in order, as transformers takes them. Logits are compared on the real (non-padding) positions.

Tolerances: fp32 rounding alone moves these logits by a few 1e-6 *relative to their scale* (the two models are
equally far from an fp64 run), so the fp32 comparison uses weights whose logits stay near 0.2 (soft cap 0.25,
so the cap is active) and holds them to 1e-6. The fp64 comparison (norms, softmax and RoPE angles stay fp64)
shows the two implementations compute the same function to ~1e-15 (tolerance 1e-12).
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma4_eqx as g4
import hf_reference
from gemma4_eqx import nnx as g4nnx
from gemma4_eqx.testing import filled_model

# fp32 rounding moves the logits by ~1e-6 relative to their scale, so for the absolute 1e-6 check the logits are
# kept near 0.2 (and the cap at 0.25, where tanh is far from linear). Measured worst case 3.3e-7 over 4 seeds.
SOFTCAP = 0.25
EMBED_STD = 0.03  # tied table: token embeddings ~0.24 after the sqrt(64) scale
QK_NORM_GAIN = 0.35  # attention scaling is 1.0: full-size q/k norms make random attention sharp (chaotic)
FINAL_NORM_GAIN = 0.25
FP32_TOL = 1e-6
FP64_TOL = 1e-12
HF_TOL = 1e-4


# ---- a random checkpoint in which nothing is left at ones / zeros ------------------------------------
def random_model(cfg: g4.Gemma4Config, seed: int) -> g4.Gemma4:
    """Every leaf drawn afresh (numpy, no compilation): linears N(0, 1/fan_in), norm weights gain * (1 + 0.3 N),
    LayerNorm biases 0.1 N, distinct layer scalars in [0.5, 1.5]."""

    def draw(name, shape, rng):
        normal = lambda std=1.0, mean=0.0: mean + std * rng.standard_normal(shape)
        if name == "embed_tokens":
            return normal(EMBED_STD)
        if name == "norm.weight":
            return FINAL_NORM_GAIN * normal(0.3, 1.0)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            return QK_NORM_GAIN * normal(0.3, 1.0)
        if name.endswith("layer_scalar"):
            return rng.uniform(0.5, 1.5, shape)
        if name.endswith("pos_embedding"):
            return normal(0.5)
        if name.endswith(".bias"):
            return normal(0.1)
        if "norm" in name or "_ln" in name:  # RMSNorm and vision LayerNorm weights
            return normal(0.3, 1.0)
        return normal(1.0 / math.sqrt(shape[-2]))  # linear [.., in, out]

    return filled_model(cfg, draw, seed=seed)


@pytest.fixture(scope="module")
def cfg():
    return g4.small_config(final_logit_softcapping=SOFTCAP)


@pytest.fixture(scope="module")
def folder(cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("nnx_ckpt")
    g4.save(random_model(cfg, seed=1), path)
    return path


@pytest.fixture(scope="module")
def models(folder):
    return g4.load(folder), g4nnx.load(folder)


# ---- batches laid out as the processor lays them out -------------------------------------------------
# Every batch has the same shapes (one compilation serves all cases): 3 rows of 48 slots (six sliding windows),
# per row 2 images of up to 12 patches, 2 video frames of up to 6 patches and 1 audio clip of up to 10 frames.
# Media a row does not use are all padding (no valid patch / frame), which contributes no soft token.
W = 8  # small_config's sliding window
ROWS, SLOTS = 3, 6 * W
ITEMS = {"image": (2, 12), "frame": (2, 6), "clip": (1, 10)}  # per row: (count, patches or frames)


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray  # [B, S]
    attention_mask: np.ndarray  # [B, S] bool
    positions: np.ndarray  # [B, S]: cumsum(attention_mask) - 1, pads 0 (what generate() builds)
    mm_token_type_ids: np.ndarray  # [B, S]
    per_sample: dict[str, np.ndarray]  # media with a leading row axis: [B, items, ...]

    def common(self) -> dict:
        return {"attention_mask": jnp.asarray(self.attention_mask), "positions": jnp.asarray(self.positions),
                "mm_token_type_ids": jnp.asarray(self.mm_token_type_ids)}

    def eqx_kwargs(self) -> dict:
        """Per sample, for the vmapped Equinox model."""
        return {**self.common(), **{k: jnp.asarray(v) for k, v in self.per_sample.items()}}

    def nnx_kwargs(self) -> dict:
        """All items of the batch stacked in row order, as transformers takes them."""
        return {**self.common(), **{k: jnp.asarray(v.reshape(-1, *v.shape[2:])) for k, v in self.per_sample.items()}}


def make_batch(cfg: g4.Gemma4Config, rows: list[list[tuple]], seed: int) -> Batch:
    """rows: after a bos, segments ("text", n) | ("image", (W, H)) | ("video", [(W, H) per frame]) | ("audio", n)."""
    rng = np.random.default_rng(seed)
    patch_dim, samples, v = cfg.vision.patch_dim, cfg.audio.audio_embed_dim, cfg.text.vocab_size

    def patches(grid, size):
        w, h = grid
        n = w * h
        pv = np.zeros((size, patch_dim), np.float32)
        pv[:n] = rng.integers(0, 256, (n, patch_dim)) / np.float32(255.0)  # like the processor: k / 255
        pos = np.full((size, 2), -1, np.int32)
        pos[:n, 0], pos[:n, 1] = np.arange(n) % w, np.arange(n) // w
        return pv, pos

    def clip(n, size):
        feats = np.zeros((size, samples), np.float32)
        feats[:n] = rng.uniform(-0.8, 0.8, (n, samples))
        return feats, np.arange(size) < n

    ids_all = np.zeros((ROWS, SLOTS), np.int32)
    types_all = np.zeros((ROWS, SLOTS), np.int32)
    mask = np.zeros((ROWS, SLOTS), bool)
    media: dict[str, list] = {k: [] for k in ("pixel_values", "image_position_ids", "pixel_values_videos",
                                              "video_position_ids", "input_features", "input_features_mask")}
    assert len(rows) == ROWS
    for r, segments in enumerate(rows):
        ids, types = [cfg.text.bos_token_id], [0]
        images, frames, clips = [], [], []
        for kind, arg in segments:
            if kind == "text":
                ids += rng.integers(3, v - 8, arg).tolist()
                types += [0] * arg
            elif kind == "image":
                n = arg[0] * arg[1]
                ids += [cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id]
                types += [0] + [1] * n + [0]
                images.append(patches(arg, ITEMS["image"][1]))
            elif kind == "video":  # each frame: 2 timestamp tokens, then its own [boi] soft tokens [eoi] block
                for grid in arg:
                    n = grid[0] * grid[1]
                    ids += rng.integers(3, v - 8, 2).tolist() + [cfg.boi_token_id] + [cfg.video_token_id] * n
                    ids += [cfg.eoi_token_id]
                    types += [0, 0, 0] + [2] * n + [0]
                    frames.append(patches(grid, ITEMS["frame"][1]))
            elif kind == "audio":
                ids += [cfg.boa_token_id] + [cfg.audio_token_id] * arg + [cfg.eoa_token_id]
                types += [0] + [3] * arg + [0]
                clips.append(clip(arg, ITEMS["clip"][1]))
            else:
                raise ValueError(kind)
        assert len(ids) <= SLOTS, len(ids)
        ids_all[r, SLOTS - len(ids):], types_all[r, SLOTS - len(ids):], mask[r, SLOTS - len(ids):] = ids, types, True
        images += [patches((0, 0), ITEMS["image"][1])] * (ITEMS["image"][0] - len(images))
        frames += [patches((0, 0), ITEMS["frame"][1])] * (ITEMS["frame"][0] - len(frames))
        clips += [clip(0, ITEMS["clip"][1])] * (ITEMS["clip"][0] - len(clips))
        for (a, b), items in ((("pixel_values", "image_position_ids"), images),
                              (("pixel_values_videos", "video_position_ids"), frames),
                              (("input_features", "input_features_mask"), clips)):
            media[a].append(np.stack([x for x, _ in items]))
            media[b].append(np.stack([y for _, y in items]))
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return Batch(ids_all, mask, positions, types_all, {k: np.stack(x) for k, x in media.items()})


CASES = {
    "long_text": [[("text", SLOTS - 1)]] * ROWS,
    "left_padding": [[("text", SLOTS - 1)], [("text", SLOTS - 9)], [("text", SLOTS - 18)]],
    "images": [[("text", 3), ("image", (3, 2)), ("text", 2), ("image", (2, 2)), ("text", 3)],
               [("text", 1), ("image", (3, 3)), ("text", 2), ("image", (2, 1))],
               [("text", 10)]],
    "image_longer_than_window": [[("text", 2), ("image", (4, 3)), ("text", 5)], [("image", (3, 4)), ("text", 1)],
                                 [("text", 3), ("image", (2, 5)), ("image", (1, 1))]],
    "video": [[("text", 2), ("video", [(2, 2), (2, 1)]), ("text", 2)], [("video", [(2, 3), (2, 3)]), ("text", 6)],
              [("text", 5), ("video", [(1, 1)]), ("text", 1)]],
    "audio": [[("text", 2), ("audio", 5), ("text", 3)], [("audio", 9), ("text", 2)], [("text", 4)]],
    "mixed_long": [[("text", 4), ("image", (3, 3)), ("text", 3), ("audio", 6), ("video", [(2, 2), (1, 3)]),
                    ("text", 4)],
                   [("image", (2, 2)), ("audio", 3), ("text", 16), ("video", [(2, 2), (2, 2)]), ("text", 2)],
                   [("text", 30), ("audio", 10)]],
}
VISION_CASES = ("images", "image_longer_than_window", "video", "mixed_long")


@pytest.fixture(scope="module")
def batches(cfg):
    return {name: make_batch(cfg, rows, seed=i) for i, (name, rows) in enumerate(CASES.items())}


@eqx.filter_jit
def eqx_forward(model: g4.Gemma4, input_ids, kwargs):
    """Logits in both mask modes and hidden states, one sequence at a time."""
    out = {mode: jax.vmap(lambda ids, kw: model(ids, **kw, mask_mode=mode))(input_ids, kwargs)
           for mode in g4nnx.MASK_MODES}
    out["hidden"] = jax.vmap(lambda ids, kw: model.hidden_states(ids, **kw))(input_ids, kwargs)
    return out


@nnx.jit
def nnx_forward(ref: g4nnx.Gemma4NNX, input_ids, kwargs):
    out = {mode: ref.logits(input_ids, **kwargs, mask_mode=mode) for mode in g4nnx.MASK_MODES}
    out["hidden"] = ref(input_ids, **kwargs)
    return out


def _max_diff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[np.asarray(mask)].max())


def _compare(model, ref, batch: Batch, case: str, logits_tol: float, hidden_tol: float) -> dict[str, float]:
    ids = jnp.asarray(batch.input_ids)
    expected = eqx_forward(model, ids, batch.eqx_kwargs())
    got = nnx_forward(ref, ids, batch.nnx_kwargs())
    diffs = {k: _max_diff(got[k], expected[k], batch.attention_mask) for k in expected}
    assert diffs["intended"] <= logits_tol and diffs["hf_forward"] <= logits_tol, diffs
    assert diffs["hidden"] <= hidden_tol, diffs
    modes_differ = _max_diff(got["intended"], got["hf_forward"], batch.attention_mask) > 1e-4
    assert modes_differ == (case in VISION_CASES)  # only vision blocks make the two mask modes differ
    return {k: np.asarray(v) for k, v in got.items()}


# ---- Equinox == NNX -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_nnx_matches_equinox_fp32(models, batches, case):
    model, ref = models
    batch = batches[case]
    got = _compare(model, ref, batch, case, FP32_TOL, hidden_tol=1e-5)  # hidden states are O(1), not capped
    scale = np.abs(got["intended"][batch.attention_mask]).max()
    assert 0.3 * SOFTCAP < scale < SOFTCAP  # the soft cap is doing something, the logits are not degenerate


@pytest.fixture(scope="module")
def models_fp64(folder):
    with jax.enable_x64(True):
        return g4.load(folder, dtype=jnp.float64), g4nnx.load(folder, dtype=jnp.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_matches_equinox_fp64(models_fp64, batches, case):
    """The same function: in fp64 (norms, softmax, RoPE angles stay fp64) the two agree to rounding."""
    with jax.enable_x64(True):
        model, ref = models_fp64
        assert ref.dtype == jnp.float64 and model.dtype == jnp.float64
        _compare(model, ref, batches[case], case, FP64_TOL, FP64_TOL)


def test_image_features_match_equinox(models, batches):
    model, ref = models
    kw = batches["images"].nnx_kwargs()
    # both sides compiled (eagerly, every operation compiles alone); measured 7e-7 jitted, 8e-7 eagerly
    got = nnx.jit(lambda r, x, pos: r.get_image_features(x, pos))(ref, kw["pixel_values"], kw["image_position_ids"])
    expected = eqx.filter_jit(lambda m, x, pos: m.image_features(x, pos))(model, kw["pixel_values"],
                                                                         kw["image_position_ids"])
    assert got.shape == (6, 12, 64)
    # four float32 ulps of the largest feature (|x| <= 3.3; measured 3.1 of them on an AVX2-only AMD EPYC)
    bound = 4 * np.finfo(np.float32).eps * float(np.abs(np.asarray(expected)).max())
    assert _max_diff(got, expected, np.ones(got.shape[:2], bool)) <= bound


# ---- NNX behaviour of its own -------------------------------------------------------------------------
def test_padding_keys_are_never_visible(models, batches):
    """Changing what sits under the padding changes nothing at the real positions."""
    _, ref = models
    batch = batches["left_padding"]
    kw = batch.nnx_kwargs()
    ids = jnp.asarray(batch.input_ids)
    other = jnp.where(jnp.asarray(batch.attention_mask), ids, 7)
    a, b = nnx_forward(ref, ids, kw), nnx_forward(ref, other, kw)
    assert _max_diff(a["intended"], b["intended"], batch.attention_mask) == 0.0


def test_placeholder_count_mismatch_is_an_error(models, batches):
    _, ref = models
    batch = batches["images"]
    kw = batch.nnx_kwargs()
    positions = np.array(kw["image_position_ids"])
    positions[0, 0] = -1  # one soft token fewer than placeholders
    kw["image_position_ids"] = jnp.asarray(positions)
    with pytest.raises(ValueError, match="images: the batch has 21 placeholder tokens but the inputs give 20"):
        ref.logits(jnp.asarray(batch.input_ids), **kw)
    embed = nnx.jit(lambda ref, ids, kw: ref.embed(ids, **{k: v for k, v in kw.items() if k not in batch.common()}))
    with pytest.raises(Exception, match="images: the batch has some placeholder tokens but the inputs give a "
                                        "different number of valid soft tokens"):
        jax.block_until_ready(embed(ref, jnp.asarray(batch.input_ids), kw))


def test_unknown_mask_mode_is_an_error(models):
    with pytest.raises(ValueError, match="mask_mode: expected one of"):
        models[1].logits(jnp.ones((1, 4), jnp.int32), mask_mode="bidirectional")


def test_bf16_load_tracks_transformers_bf16():
    """`load(dtype=bfloat16)` casts an fp32 checkpoint (as `from_pretrained(dtype=torch.bfloat16)` does); the bf16
    model is as close to the fp32 logits as transformers' own bf16 run (x1.25) and picks the same argmax wherever
    transformers' top-2 margin exceeds that error. (Bitwise bf16 parity is not expected: reduction order.)"""
    name = "tiny_a"
    if name not in hf_reference.checkpoints():
        pytest.skip("no recorded transformers fixtures")
    ref = g4nnx.load(hf_reference.checkpoint_dir(name), dtype=jnp.bfloat16)
    assert ref.dtype == jnp.bfloat16 and ref.layers[5].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    case, exact = hf_reference.cases(name)["left_pad_bf16"], hf_reference.cases(name)["left_pad"]["logits"]
    kwargs = {ours: jnp.asarray(case[hf]) for hf, ours in HF_INPUTS.items() if hf in case}
    ours = nnx.jit(lambda ref, ids, kw: ref.logits(ids, **kw))(ref, jnp.asarray(case["input_ids"]), kwargs)
    assert ours.dtype == jnp.bfloat16
    ours, theirs, valid = np.asarray(ours.astype(jnp.float32)), case["logits"], case["attention_mask"]
    their_error = np.abs(theirs - exact)[valid].max()
    assert np.abs(ours - exact)[valid].max() <= 1.25 * their_error
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    decided = valid & (top2[..., 1] - top2[..., 0] > their_error)
    assert (ours.argmax(-1) == theirs.argmax(-1))[decided].all()


def test_parameters_follow_transformers_names_and_layout(folder, models):
    from safetensors.numpy import load_file

    _, ref = models
    tensors = load_file(str(folder / "model.safetensors"))
    params = g4nnx.named_params(ref)
    assert params.keys() == tensors.keys()
    q = "model.language_model.layers.5.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.asarray(params[q][...]).T, tensors[q])  # [in, out] here, [out, in] on disk
    assert ref.layers[5].self_attn.v_proj is None  # keys-as-values full layer
    assert ref.layers[4].self_attn.v_proj is not None


def test_12b_builds_abstractly_with_the_equinox_parameter_count():
    cfg = g4.Gemma4Config.gemma4_12b()
    ref = nnx.eval_shape(lambda: g4nnx.Gemma4NNX(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    model = eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0), dtype=jnp.bfloat16))
    assert g4nnx.parameter_count(ref) == g4.count_parameters(model) == 11_959_730_224
    assert len(ref.layers) == 48 and len(g4nnx.tensor_specs(ref)) == 677
    assert ref.layers[47].self_attn.q_proj.kernel.get_value().shape == (3840, 8192)


# ---- NNX == transformers (recorded fixtures) ----------------------------------------------------------
# Each case is left-padded (positions kept) and its media padded with all-padding items to the largest shapes of
# its checkpoint, so one compilation serves every case; neither changes a valid position's computation.
HF_INPUTS = {"attention_mask": "attention_mask", "position_ids": "positions", "mm_token_type_ids": "mm_token_type_ids",
             "pixel_values": "pixel_values", "image_position_ids": "image_position_ids",
             "pixel_values_videos": "pixel_values_videos", "video_position_ids": "video_position_ids",
             "input_features": "input_features", "input_features_mask": "input_features_mask"}
HF_OUTPUTS = {"logits": "hf_forward", "logits_hf_forward": "hf_forward", "logits_intended": "intended"}
MEDIA = (("pixel_values", "image_position_ids"), ("pixel_values_videos", "video_position_ids"),
         ("input_features", "input_features_mask"))


def _hf_fp32_cases(name: str) -> dict[str, dict]:
    return {c: d for c, d in hf_reference.cases(name).items()
            if any(f in d for f in HF_OUTPUTS) and hf_reference.meta(d).get("dtype") == "float32"}


def _pad_case(case: dict, cfg: g4.Gemma4Config, shapes: dict) -> dict:
    b, s = case["input_ids"].shape
    rows, slots = shapes["rows"], shapes["slots"]

    def left_pad(x, fill):
        out = np.full((rows, slots), fill, x.dtype)
        out[:b, slots - s:] = x
        return out

    mask = case.get("attention_mask", np.ones((b, s), bool)).astype(bool)
    positions = case.get("position_ids", np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)))
    out = {"input_ids": left_pad(case["input_ids"], 0), "attention_mask": left_pad(mask, False),
           "positions": left_pad(positions, 0),
           "mm_token_type_ids": left_pad(case.get("mm_token_type_ids", np.zeros((b, s), np.int32)), 0)}
    widths = {"pixel_values": cfg.vision.patch_dim, "pixel_values_videos": cfg.vision.patch_dim,
              "input_features": cfg.audio.audio_embed_dim}
    for values, where in MEDIA:
        n, p = shapes[values]
        x = np.zeros((n, p, widths[values]), np.float32)
        # image/video positions: -1 marks a padding patch; audio mask: False marks a padding frame
        y = np.full((n, p, 2), -1, np.int32) if values != "input_features" else np.zeros((n, p), bool)
        if values in case:
            k, q = case[values].shape[:2]
            x[:k, :q], y[:k, :q] = case[values], case[where]
        out[values], out[where] = x, y
    return out


@nnx.jit
def nnx_both_modes(ref: g4nnx.Gemma4NNX, kwargs):
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids")
    return {mode: ref.logits(ids, **kwargs, mask_mode=mode) for mode in g4nnx.MASK_MODES}


@pytest.mark.parametrize("name", hf_reference.checkpoints())
def test_nnx_matches_transformers(name):
    cases = _hf_fp32_cases(name)
    assert cases, f"{name}: no fp32 cases recorded"
    ref = g4nnx.load(hf_reference.checkpoint_dir(name))
    shapes = {"rows": max(c["input_ids"].shape[0] for c in cases.values()),
              "slots": max(c["input_ids"].shape[1] for c in cases.values())}
    for values, _ in MEDIA:
        sizes = [c[values].shape[:2] for c in cases.values() if values in c] or [(1, 1)]
        shapes[values] = tuple(max(sz[i] for sz in sizes) for i in range(2))
    worst = {}
    for case_name, case in cases.items():
        padded = _pad_case(case, ref.config, shapes)
        got = nnx_both_modes(ref, {k: jnp.asarray(v) for k, v in padded.items()})
        b, s = case["input_ids"].shape
        valid = case.get("attention_mask", np.ones((b, s), bool)).astype(bool)
        for field, mode in HF_OUTPUTS.items():
            if field in case:
                logits = np.asarray(got[mode])[:b, -s:]
                worst[f"{case_name}/{field}"] = _max_diff(logits, case[field], valid)
    assert max(worst.values()) <= HF_TOL, worst
