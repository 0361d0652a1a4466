#!/usr/bin/env python
"""Record HuggingFace reference fixtures for the gemma4-eqx port.

Builds three tiny random ``Gemma4UnifiedForConditionalGeneration`` checkpoints
(``model_type = gemma4_unified``) that keep the real structure of
google/gemma-4-12B (5:1 sliding/full layer pattern, k_eq_v full layers with a
wider ``global_head_dim`` and one KV head, proportional RoPE on full layers,
final logit soft-cap, vision + audio embedders), saves them with
``save_pretrained`` and records HF (eager attention) outputs for a set of
text, multimodal and generation cases.

Usage (deterministic, re-runnable; overwrites the output folder)::

    .venv-hf/bin/python scripts/record_hf_reference.py --out tests/fixtures/hf

Layout written::

    <out>/<name>/checkpoint/{config.json, model.safetensors, generation_config.json}
    <out>/<name>/cases.npz      keys "<case>/<field>", plus "_info/meta"

bf16 module trace (a separate mode; reads the checkpoints and cases above, rewrites only bf16_trace.npz)::

    .venv-hf/bin/python scripts/record_hf_reference.py --out tests/fixtures/hf --bf16-trace [--only tiny_a]

loads ``<name>/checkpoint`` with ``from_pretrained(..., dtype=torch.bfloat16, attn_implementation="eager")``, runs
the inputs of the cases in ``TRACE_PLAN`` (``text_long_bf16``, ``left_pad_bf16``; ``position_ids`` passed when
recorded) with forward hooks on ``layers.<i>`` and every submodule below it (to ``layers.<i>.mlp.act_fn``) and a
wrapped ``eager_attention_forward``, asserts that the logits equal ``cases.npz``'s, and writes
``<out>/<name>/bf16_trace.npz`` (np.savez_compressed):

    "<case>/layers.<i>[.<module>]|in", "|out"   uint16: the bf16 bit patterns (``arr.view(ml_dtypes.bfloat16)``)
        of the module's first input (positional or ``hidden_states=``) and first output, HF's shapes
        ([B,T,hidden]; q/k/v_norm [B,T,heads,head_dim]); <module> is e.g. ``input_layernorm``,
        ``self_attn.q_proj``, ``self_attn.v_norm``, ``self_attn``, ``mlp.act_fn``, ``mlp``; none = the whole layer
    "<case>/layers.<i>.self_attn.core|q", "|k", "|v", "|out"   uint16 bf16 bits, the eager attention core's
        q/k/v (after q/k norm, RoPE, v_norm) and output, all [B,T,heads,head_dim] (q/k/v transposed from HF's
        [B,heads,T,D]; k/v unrepeated, kv_heads)
    "<case>/layers.<i>.self_attn.core|mask"   bool [B,T,T] (query, key), True = attend (HF's additive mask == 0)
    "<case>/position_ids"   i32 [B,T] (arange when the case passes none);  "<case>/attention_mask"   bool [B,T]
    "_aliases"   0-d JSON {key: [stored key, shape]}: a tensor equal to one already stored (e.g. k_proj|in ==
        q_proj|in == input_layernorm|out) is stored once; read a key as data[stored].reshape(shape)
    "_info"      0-d JSON: checkpoint, cases, layers (traced: the first n), layer_types, versions

See tests/fixtures/hf/README.md for the key layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from torch import nn

import transformers
from transformers import GenerationConfig
from transformers import masking_utils
from transformers.models.gemma4_unified import modeling_gemma4_unified as mg
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedConfig

Model = mg.Gemma4UnifiedForConditionalGeneration

EXPECTED_TRANSFORMERS = "5.24.0"
PATCH_DIM = 48 * 48 * 3  # 6912
AUDIO_DIM = 640

# ---------------------------------------------------------------------------------------------
# Checkpoint definitions
# ---------------------------------------------------------------------------------------------
CHECKPOINTS = {
    "tiny_a": dict(
        seed=1001,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        final_logit_softcapping=30.0,
        mm_embed_dim=32,
        mm_posemb_size=40,
        multimodal_cases=True,
    ),
    "tiny_b": dict(
        seed=1002,
        vocab_size=512,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=64,
        sliding_window=16,
        final_logit_softcapping=30.0,
        mm_embed_dim=32,
        mm_posemb_size=40,
        multimodal_cases=True,
    ),
    "tiny_c": dict(
        seed=1003,
        vocab_size=384,
        hidden_size=48,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        global_head_dim=16,
        sliding_window=8,
        final_logit_softcapping=10.0,  # small cap so tanh saturation is strongly exercised
        mm_embed_dim=24,
        mm_posemb_size=40,
        multimodal_cases=False,  # text + generation cases only (keeps fixtures small)
    ),
}

# Perturbation scales (see perturb_weights). Chosen by measuring the random models against a float64 copy:
# - EMBED_STD: tied embedding rows ~N(0, 0.6^2): logits reach ~20-25 (soft-cap 30 clearly active, several % of
#   |logits| > 10); larger values only scale up every absolute error.
# - POST_NORM_GAIN: post_attention/post_feedforward norm weights = 3.6 * (1 + 0.3 randn). With gain 1 the
#   sqrt(hidden)-scaled embedding dominates the residual stream and the model just predicts its input token
#   (greedy generation = constant); 3.6 keeps the embedding/branch ratio of "std 1, gain 6".
# - QK_NORM_GAIN: q_norm/k_norm weights = 0.4 * (1 + 0.3 randn). Attention scaling is 1.0 (no 1/sqrt(d)); with
#   gain 1 the random attention is so sharp that the network is chaotic (HF bf16 vs fp32 logits differ by ~20,
#   fp32 vs fp64 by ~2e-3). With 0.4: fp32 vs fp64 <= ~5e-5, bf16 vs fp64 <= ~1.2 (max abs).
EMBED_STD = 0.6
NORM_STD = 0.3  # every RMSNorm weight = gain * (1 + 0.3 randn), never all ones
POST_NORM_GAIN = 3.6
QK_NORM_GAIN = 0.4


def special_ids(V: int) -> dict:
    """Token-id rule for a vocab of size V (all special ids inside the small vocab)."""
    return dict(
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        boi_token_id=V - 7,
        boa_token_id=V - 6,
        image_token_id=V - 5,
        audio_token_id=V - 4,
        eoi_token_id=V - 3,
        eoa_token_index=V - 2,
        video_token_id=V - 1,
    )


def build_config(spec: dict) -> Gemma4UnifiedConfig:
    V = spec["vocab_size"]
    n = spec["num_hidden_layers"]
    assert n % 6 == 0
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    sid = special_ids(V)
    text_config = dict(
        vocab_size=V,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=n,
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"],
        global_head_dim=spec["global_head_dim"],
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=layer_types,
        sliding_window=spec["sliding_window"],
        final_logit_softcapping=spec["final_logit_softcapping"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        use_bidirectional_attention="vision",
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        attention_bias=False,
        attention_dropout=0.0,
        pad_token_id=sid["pad_token_id"],
        eos_token_id=sid["eos_token_id"],
        bos_token_id=sid["bos_token_id"],
    )
    vision_config = dict(
        patch_size=16,
        pooling_kernel_size=3,
        mm_embed_dim=spec["mm_embed_dim"],
        output_proj_dims=spec["mm_embed_dim"],  # HF requires output_proj_dims == mm_embed_dim
        mm_posemb_size=spec["mm_posemb_size"],
        rms_norm_eps=1e-6,
    )
    audio_config = dict(audio_embed_dim=AUDIO_DIM, rms_norm_eps=1e-6)
    cfg = Gemma4UnifiedConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        boi_token_id=sid["boi_token_id"],
        eoi_token_id=sid["eoi_token_id"],
        image_token_id=sid["image_token_id"],
        video_token_id=sid["video_token_id"],
        boa_token_id=sid["boa_token_id"],
        eoa_token_index=sid["eoa_token_index"],
        audio_token_id=sid["audio_token_id"],
        tie_word_embeddings=True,
    )
    tc = cfg.text_config
    assert tc.layer_types == layer_types
    for i, lt in enumerate(layer_types):
        lc = tc.per_layer_config[i]
        if lt == "full_attention":
            assert lc.head_dim == spec["global_head_dim"] and lc.num_key_value_heads == 1, (i, lc.head_dim)
        else:
            assert lc.head_dim == spec["head_dim"] and lc.num_key_value_heads == spec["num_key_value_heads"]
    return cfg


def perturb_weights(model: nn.Module, seed: int) -> dict:
    """Deterministically re-initialise every weight so that no default (ones/zeros) can hide a bug."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    layer_scalars = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, mg.Gemma4UnifiedRMSNorm):
                if mod.with_scale:
                    if ".post_attention_layernorm" in name or ".post_feedforward_layernorm" in name:
                        gain = POST_NORM_GAIN
                    elif name.endswith(".q_norm") or name.endswith(".k_norm"):
                        gain = QK_NORM_GAIN
                    else:
                        gain = 1.0
                    mod.weight.copy_(gain * (1.0 + NORM_STD * randn(mod.weight.shape)))
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1.0 + NORM_STD * randn(mod.weight.shape))
                mod.bias.copy_(0.2 * randn(mod.bias.shape))
            elif isinstance(mod, nn.Linear):
                if name == "lm_head":
                    continue  # tied to embed_tokens
                mod.weight.copy_(randn(mod.weight.shape) / math.sqrt(mod.in_features))
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * randn(mod.bias.shape))
            elif isinstance(mod, mg.Gemma4UnifiedVisionEmbedder):
                mod.pos_embedding.copy_(0.5 * randn(mod.pos_embedding.shape))
            elif isinstance(mod, mg.Gemma4UnifiedTextScaledWordEmbedding):
                mod.weight.copy_(EMBED_STD * randn(mod.weight.shape))
        layers = model.model.language_model.layers
        # distinct per-layer scalars in [0.5, 1.5]
        vals = 0.5 + torch.rand(len(layers), generator=g, dtype=torch.float32)
        for layer, v in zip(layers, vals):
            layer.layer_scalar.copy_(v.reshape(1))
            layer_scalars.append(float(v))
    assert len(set(layer_scalars)) == len(layer_scalars)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr(), "not tied"
    return dict(layer_scalars=layer_scalars)


# ---------------------------------------------------------------------------------------------
# Prompt / input builders
# ---------------------------------------------------------------------------------------------
class Builder:
    """Builds token rows the way the Gemma4Unified processor lays them out."""

    def __init__(self, V: int, rng: np.random.Generator):
        self.V = V
        self.sid = special_ids(V)
        self.rng = rng

    def text(self, n: int) -> list[int]:
        # ordinary ids: 3 .. V-8 (0 pad, 1 eos, 2 bos, V-7.. V-1 special)
        return [int(x) for x in self.rng.integers(3, self.V - 7, size=n)]

    def row(self, segments) -> tuple[list[int], list[int]]:
        """segments: list of ("bos",) | ("text", n) | ("image", n) | ("audio", n) | ("video_frame", n, n_ts)."""
        ids, tt = [], []
        s = self.sid
        for seg in segments:
            kind = seg[0]
            if kind == "bos":
                ids += [s["bos_token_id"]]
                tt += [0]
            elif kind == "text":
                t = self.text(seg[1])
                ids += t
                tt += [0] * len(t)
            elif kind == "image":
                n = seg[1]
                ids += [s["boi_token_id"]] + [s["image_token_id"]] * n + [s["eoi_token_id"]]
                tt += [0] + [1] * n + [0]
            elif kind == "video_frame":
                n, n_ts = seg[1], seg[2]
                t = self.text(n_ts)  # "mm:ss" timestamp text tokens
                ids += t + [s["boi_token_id"]] + [s["video_token_id"]] * n + [s["eoi_token_id"]]
                tt += [0] * n_ts + [0] + [2] * n + [0]
            elif kind == "audio":
                n = seg[1]
                ids += [s["boa_token_id"]] + [s["audio_token_id"]] * n + [s["eoa_token_index"]]
                tt += [0] + [3] * n + [0]
            else:
                raise ValueError(kind)
        return ids, tt

    def batch(self, rows_segments):
        """Left-pads rows to a common length (processor/generation convention)."""
        rows = [self.row(segs) for segs in rows_segments]
        S = max(len(r[0]) for r in rows)
        B = len(rows)
        ids = np.zeros((B, S), np.int32)
        tt = np.zeros((B, S), np.int32)
        am = np.zeros((B, S), bool)
        for b, (r_ids, r_tt) in enumerate(rows):
            p = S - len(r_ids)
            ids[b, p:] = r_ids
            tt[b, p:] = r_tt
            am[b, p:] = True
            ids[b, :p] = self.sid["pad_token_id"]
        return ids, am, tt

    def images(self, grids, P):
        """grids: list of (W, H) merged-patch grids. Returns pixel_values [N,P,6912] f32, positions [N,P,2] i32."""
        N = len(grids)
        pv = np.zeros((N, P, PATCH_DIM), np.float32)
        pos = np.full((N, P, 2), -1, np.int32)
        for k, (W, H) in enumerate(grids):
            n = W * H
            assert n <= P
            # like real images: uint8 / 255 (processor rescales by 1/255, no mean/std normalisation)
            pv[k, :n] = self.rng.integers(0, 256, size=(n, PATCH_DIM)).astype(np.float32) / np.float32(255.0)
            i = np.arange(n)
            pos[k, :n, 0] = i % W
            pos[k, :n, 1] = i // W
        return pv, pos

    def audio(self, frame_counts, F=None):
        F = F or max(frame_counts)
        feats = np.zeros((len(frame_counts), F, AUDIO_DIM), np.float32)
        mask = np.zeros((len(frame_counts), F), bool)
        for k, n in enumerate(frame_counts):
            # 16 kHz waveform samples, reshaped to [n, 640]; padded frames are zeros with mask False
            feats[k, :n] = self.rng.uniform(-0.8, 0.8, size=(n, AUDIO_DIM)).astype(np.float32)
            mask[k, :n] = True
        return feats, mask


def generate_position_ids(am: np.ndarray) -> np.ndarray:
    """Replicates GenerationMixin._prepare_position_ids_for_generation (transformers 5.24)."""
    pos = np.cumsum(am.astype(np.int64), axis=-1) - 1
    pos = np.where(am, pos, 0)
    return pos.astype(np.int32)


# numpy dtype of every stored input field -> torch dtype passed to HF
INT_FIELDS = {"input_ids", "position_ids", "mm_token_type_ids", "image_position_ids", "video_position_ids",
              "num_frames_per_video"}
BOOL_FIELDS = {"attention_mask", "input_features_mask"}
FLOAT_FIELDS = {"pixel_values", "pixel_values_videos", "input_features"}


def to_torch(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if k in INT_FIELDS:
            out[k] = torch.from_numpy(v.astype(np.int64))
        elif k == "attention_mask":
            out[k] = torch.from_numpy(v.astype(np.int64))  # tokenizer convention (0/1 long)
        elif k in BOOL_FIELDS:
            out[k] = torch.from_numpy(v.astype(bool))
        elif k in FLOAT_FIELDS:
            out[k] = torch.from_numpy(v.astype(np.float32))
        else:
            raise KeyError(k)
    return out


def check_inputs(inputs: dict):
    for k, v in inputs.items():
        if k in INT_FIELDS:
            assert v.dtype == np.int32, (k, v.dtype)
        elif k in BOOL_FIELDS:
            assert v.dtype == np.bool_, (k, v.dtype)
        elif k in FLOAT_FIELDS:
            assert v.dtype == np.float32, (k, v.dtype)


# ---------------------------------------------------------------------------------------------
# Mask helpers
# ---------------------------------------------------------------------------------------------
def intended_masks(model, inputs_t: dict) -> dict:
    """Spec §5.3 masks from the class-level static create_masks_for_generate.

    inputs_embeds is computed exactly as Gemma4UnifiedModel.forward does before splicing (placeholders -> pad
    id, scaled lookup); the mask builder only reads its batch/seq shape, dtype and device.
    """
    cfg = model.config
    ids = inputs_t["input_ids"]
    mm = (ids == cfg.image_token_id) | (ids == cfg.video_token_id) | (ids == cfg.audio_token_id)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.where(mm, cfg.text_config.pad_token_id, ids))
    pos = inputs_t.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
    return Model.create_masks_for_generate(
        config=cfg,
        inputs_embeds=embeds,
        attention_mask=inputs_t.get("attention_mask"),
        cache=None,
        position_ids=pos,
        mm_token_type_ids=inputs_t.get("mm_token_type_ids"),
    )


def hf_forward_masks(model, inputs_t: dict) -> dict:
    """The masks Gemma4UnifiedModel.forward builds itself when handed a 2-D attention_mask (spec §5.4)."""
    cfg = model.config
    ids = inputs_t["input_ids"]
    embeds = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=model.dtype)
    pos = inputs_t.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
    bsi = torch.full(ids.shape, -1)
    if inputs_t.get("mm_token_type_ids") is not None:
        bsi = mg.get_block_sequence_ids_for_mask(inputs_t["mm_token_type_ids"], device=ids.device)
    return masking_utils.create_masks_for_generate(
        config=cfg.get_text_config(),
        inputs_embeds=embeds,
        attention_mask=inputs_t.get("attention_mask"),
        cache=None,
        position_ids=pos,
        block_sequence_ids=bsi,
    )


def to_bool_mask(m: torch.Tensor, B: int, S: int) -> np.ndarray:
    assert m.shape == (B, 1, S, S), m.shape
    return (m[:, 0] == 0).numpy()


def spec_masks(am: np.ndarray, tt: np.ndarray | None, W: int):
    """Independent numpy construction of spec §5.3 (intended) and §5.4 (HF bare forward) masks, [B,S,S] bool."""
    B, S = am.shape
    q = np.arange(S)[:, None]
    k = np.arange(S)[None, :]
    causal = (k <= q)[None]
    window = (k > q - W)[None]
    pad = am[:, None, :]
    if tt is None:
        blk = np.full((B, S), -1)
    else:
        vis = (tt == 1) | (tt == 2)
        prev = np.zeros_like(vis)
        prev[:, 1:] = vis[:, :-1]
        starts = vis & ~prev
        blk = np.where(vis, np.cumsum(starts, axis=1) - 1, -1)
    same = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0)
    intended = {
        "full_attention": causal & pad,
        "sliding_attention": (causal | same) & window & pad,
    }
    forward = {
        "full_attention": (causal | same) & pad,
        "sliding_attention": ((causal & window) | same) & pad,
    }
    return intended, forward


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.rows = []

    def put(self, case: str, field: str, arr):
        key = f"{case}/{field}"
        assert key not in self.arrays, key
        self.arrays[key] = arr

    def meta(self, case: str, meta: dict):
        self.put(case, "meta", np.array(json.dumps(meta, sort_keys=True)))

    def inputs(self, case: str, inputs: dict):
        check_inputs(inputs)
        for k, v in inputs.items():
            self.put(case, k, v)


def logits_np(out) -> np.ndarray:
    return out.logits.detach().to(torch.float32).numpy()


def run_forward(model, inputs_t: dict, attention_mask_override=None) -> np.ndarray:
    kw = dict(inputs_t)
    if attention_mask_override is not None:
        kw["attention_mask"] = attention_mask_override
    with torch.no_grad():
        out = model(**kw, use_cache=False)
    return logits_np(out)


def valid_absmax(logits: np.ndarray, am: np.ndarray) -> float:
    return float(np.abs(logits[am]).max())


def fp64_diff(m64, inputs: dict, lg32: np.ndarray) -> float:
    """Max |fp32 - fp64| logits over valid positions (how much fp32 rounding alone moves these logits).

    Only for unpadded inputs: HF's eager softmax upcasts to fp32, where the fp64 mask minimum becomes -inf, so
    fully masked (pad) query rows turn into NaN in float64 and leak into valid rows through 0 * NaN.
    """
    it = to_torch(inputs)
    with torch.no_grad():
        lg64 = m64(**it, use_cache=False).logits.numpy()
    return float(np.abs(lg32.astype(np.float64) - lg64)[inputs["attention_mask"]].max())


def record_text_cases(rec, name, spec, b: Builder, m32, m16_load, m16_cast, m64):
    W = spec["sliding_window"]
    sc = spec["final_logit_softcapping"]

    # 1. text_short
    ids, am, _ = b.batch([[("bos",), ("text", 6)], [("bos",), ("text", 6)]])
    assert ids.shape[1] == 7 < W
    inputs = dict(input_ids=ids, attention_mask=am)
    lg = run_forward(m32, to_torch(inputs))
    rec.inputs("text_short", inputs)
    rec.put("text_short", "logits", lg)
    rec.meta("text_short", dict(kind="forward", dtype="float32", desc="2 random sequences, [bos]+6 text, shorter than "
             "the sliding window; no position_ids passed (HF uses arange)", sliding_window=W))
    rec.rows.append(("text_short", "float32", ids.shape, valid_absmax(lg, am), None))

    # 2. text_long (6x window)
    L = 6 * W
    ids, am, _ = b.batch([[("bos",), ("text", L - 1)]])
    inputs = dict(input_ids=ids, attention_mask=am)
    lg = run_forward(m32, to_torch(inputs))
    rec.inputs("text_long", inputs)
    rec.put("text_long", "logits", lg)
    rec.meta("text_long", dict(kind="forward", dtype="float32", desc=f"1 sequence of length {L} = 6 x sliding_window",
             sliding_window=W, max_abs_diff_vs_fp64=fp64_diff(m64, inputs, lg),
             fraction_abs_logit_above_10=float((np.abs(lg) > 10).mean()),
             fraction_abs_logit_above_half_cap=float((np.abs(lg) > 0.5 * sc).mean())))
    rec.rows.append(("text_long", "float32", ids.shape, valid_absmax(lg, am), None))
    frac_capped = (float((np.abs(lg) > 10).mean()), float((np.abs(lg) > 0.5 * sc).mean()))
    text_long_inputs = inputs

    # 3. left_pad
    S = 2 * W + 4
    ids, am, _ = b.batch([[("bos",), ("text", S - 1)], [("bos",), ("text", S - 1 - 5)], [("bos",), ("text", S - 1 - 11)]])
    pos = generate_position_ids(am)
    # cross-check the replica against transformers' own helper
    pos_hf = m32._prepare_position_ids_for_generation(torch.from_numpy(ids.astype(np.int64)),
                                                     {"attention_mask": torch.from_numpy(am.astype(np.int64))})
    assert np.array_equal(pos_hf.numpy(), pos), (pos_hf, pos)
    inputs = dict(input_ids=ids, attention_mask=am, position_ids=pos)
    lg = run_forward(m32, to_torch(inputs))
    rec.inputs("left_pad", inputs)
    rec.put("left_pad", "logits", lg)
    rec.meta("left_pad", dict(kind="forward", dtype="float32", pad_lengths=[0, 5, 11], desc="3 rows left-padded with "
             "pad id 0; position_ids built as generate() does: cumsum(attention_mask)-1, pad slots set to 0. Logits at "
             "pad positions (attention_mask False) are garbage (fully masked query rows): ignore them.",
             sliding_window=W))
    rec.rows.append(("left_pad", "float32", ids.shape, valid_absmax(lg, am), None))
    left_pad_inputs = inputs

    # 4. bf16 variants
    for case, inputs in (("text_long_bf16", text_long_inputs), ("left_pad_bf16", left_pad_inputs)):
        it = to_torch(inputs)
        lg = run_forward(m16_load, it)
        lg_cast = run_forward(m16_cast, it)
        am = inputs["attention_mask"]
        lg32 = rec.arrays[f"{case[:-5]}/logits"]
        rec.inputs(case, inputs)
        rec.put(case, "logits", lg)
        rec.put(case, "logits_to_bf16", lg_cast)
        d_cast = float(np.abs(lg - lg_cast)[am].max())
        d_32 = float(np.abs(lg - lg32)[am].max())
        rec.meta(case, dict(
            kind="forward", dtype="bfloat16", fp32_case=case[:-5],
            desc="same inputs as the fp32 case. 'logits' = from_pretrained(checkpoint, dtype=torch.bfloat16) "
                 "(weights/buffers bf16, RoPE inv_freq stays fp32: the real-use path). 'logits_to_bf16' = the fp32 "
                 "model followed by model.to(torch.bfloat16), which ALSO casts the RoPE inv_freq buffers to bf16. "
                 "Both stored as float32 converted from bf16.",
            max_abs_diff_vs_to_bf16=d_cast, max_abs_diff_vs_fp32=d_32))
        rec.rows.append((case, "bfloat16", inputs["input_ids"].shape, valid_absmax(lg, am),
                         f"|load-cast|={d_cast:.3g} |bf16-fp32|={d_32:.3g}"))
    return frac_capped


def record_mm_forward(rec, case, model, inputs, desc, W, expect_differ=True):
    it = to_torch(inputs)
    am = inputs["attention_mask"]
    B, S = am.shape
    tt = inputs.get("mm_token_type_ids")

    lg_fwd = run_forward(model, it)
    masks_int = intended_masks(model, it)
    lg_int = run_forward(model, it, attention_mask_override=masks_int)
    masks_fwd = hf_forward_masks(model, it)
    # the explicit forward-mode dict must reproduce the bare forward exactly
    lg_fwd2 = run_forward(model, it, attention_mask_override=masks_fwd)
    assert np.array_equal(lg_fwd, lg_fwd2), f"{case}: forward-mode mask dict does not reproduce bare forward"

    sp_int, sp_fwd = spec_masks(am, tt, W)
    for lt in ("full_attention", "sliding_attention"):
        mi = to_bool_mask(masks_int[lt], B, S)
        mf = to_bool_mask(masks_fwd[lt], B, S)
        assert np.array_equal(mi, sp_int[lt]), f"{case}: HF intended {lt} mask != spec §5.3"
        assert np.array_equal(mf, sp_fwd[lt]), f"{case}: HF forward {lt} mask != spec §5.4"
        rec.put(case, f"mask_intended_{lt}", mi)
        rec.put(case, f"mask_hf_forward_{lt}", mf)

    diff = float(np.abs(lg_fwd - lg_int)[am].max())
    if expect_differ:
        assert diff > 1e-3, f"{case}: the two mask modes do not differ ({diff})"
    else:
        assert diff == 0.0, f"{case}: mask modes unexpectedly differ ({diff})"
    rec.inputs(case, inputs)
    rec.put(case, "logits_hf_forward", lg_fwd)
    rec.put(case, "logits_intended", lg_int)
    rec.meta(case, dict(
        kind="forward_mm", dtype="float32", desc=desc, sliding_window=W,
        logits_hf_forward="plain model(**inputs): Gemma4UnifiedModel.forward builds masks with the generic "
                          "masking_utils.create_masks_for_generate(block_sequence_ids=...) -> full: (causal|block)&pad; "
                          "sliding: ((causal&window)|block)&pad (spec 5.4)",
        logits_intended="same forward with attention_mask = Gemma4UnifiedForConditionalGeneration."
                        "create_masks_for_generate(...) dict -> full: causal&pad; sliding: (causal|block)&window&pad "
                        "(spec 5.3)",
        masks="mask_<mode>_<layer_type> are the boolean [B,S,S] (query, key) masks HF used (True = attend); "
              "verified equal to an independent numpy construction of spec 5.3 / 5.4",
        max_abs_diff_modes=diff,
        position_ids_passed="position_ids" in inputs))
    rec.rows.append((case, "float32", inputs["input_ids"].shape, valid_absmax(lg_int, am), f"|fwd-intended|={diff:.3g}"))


def record_mm_cases(rec, spec, b: Builder, m32):
    W = spec["sliding_window"]

    # 5. mm_images_batch: 2 rows, images 2x3=6 and 3x4=12 merged patches, both padded to P=16; left padding
    ids, am, tt = b.batch([
        [("bos",), ("text", 4), ("image", 6), ("text", 5)],
        [("bos",), ("text", 3), ("image", 12), ("text", 5)],
    ])
    pv, ppos = b.images([(2, 3), (3, 4)], P=16)
    inputs = dict(input_ids=ids, attention_mask=am, position_ids=generate_position_ids(am), mm_token_type_ids=tt,
                  pixel_values=pv, image_position_ids=ppos)
    record_mm_forward(rec, "mm_images_batch", m32, inputs,
                      "2 rows, one image each (grids WxH 2x3 and 3x4, P=16 with (-1,-1) padding rows); row 0 is "
                      "left-padded by 5; generate-style position_ids passed", W)

    # 6. mm_long_image: 6x4 = 24 soft tokens > sliding window
    ids, am, tt = b.batch([[("bos",), ("text", 4), ("image", 24), ("text", 10)]])
    pv, ppos = b.images([(6, 4)], P=24)
    inputs = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values=pv, image_position_ids=ppos)
    record_mm_forward(rec, "mm_long_image", m32, inputs,
                      f"one image of 6x4=24 soft tokens (block longer than the sliding window {W}); no padding", W)

    # 7. mm_two_images: 3x2=6 and 3x3=9 in one sequence
    ids, am, tt = b.batch([[("bos",), ("text", 3), ("image", 6), ("text", 4), ("image", 9), ("text", 5)]])
    pv, ppos = b.images([(3, 2), (3, 3)], P=9)
    inputs = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values=pv, image_position_ids=ppos)
    record_mm_forward(rec, "mm_two_images", m32, inputs,
                      "two images (grids 3x2 and 3x3, P=9) in one sequence -> two separate bidirectional blocks", W)

    # 8. mm_audio: 2 clips, 7 and 12 valid frames (clip 0 padded with mask False), left-padded rows
    ids, am, tt = b.batch([
        [("bos",), ("text", 4), ("audio", 7), ("text", 6)],
        [("bos",), ("text", 3), ("audio", 12), ("text", 6)],
    ])
    feats, fmask = b.audio([7, 12])
    inputs = dict(input_ids=ids, attention_mask=am, position_ids=generate_position_ids(am), mm_token_type_ids=tt,
                  input_features=feats, input_features_mask=fmask)
    record_mm_forward(rec, "mm_audio", m32, inputs,
                      "2 rows, one audio clip each (7 and 12 valid 640-sample frames; input_features padded to 12 "
                      "frames, mask False on padding); row 0 left-padded; audio is never bidirectional so both mask "
                      "modes are identical here", W, expect_differ=False)

    # 9. mm_video: 3 frames of 2x2 patches (P=6), each frame "ts ts [boi] 4x[video] [eoi]"
    ids, am, tt = b.batch([[("bos",), ("text", 3), ("video_frame", 4, 2), ("text", 1), ("video_frame", 4, 2),
                            ("text", 1), ("video_frame", 4, 2), ("text", 4)]])
    pvv, vpos = b.images([(2, 2)] * 3, P=6)
    inputs = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values_videos=pvv,
                  video_position_ids=vpos, num_frames_per_video=np.array([3], np.int32))
    record_mm_forward(rec, "mm_video", m32, inputs,
                      "one video, 3 frames of 2x2 merged patches (P=6); per frame 2 timestamp text tokens, then the "
                      "IMAGE boi, 4 video soft tokens (type 2), IMAGE eoi; frames separated by 1 text token; each "
                      "frame is its own bidirectional block", W)

    # 10. mm_mixed: text + image + audio
    ids, am, tt = b.batch([[("bos",), ("text", 3), ("image", 6), ("text", 2), ("audio", 5), ("text", 4)]])
    pv, ppos = b.images([(2, 3)], P=8)
    feats, fmask = b.audio([5], F=6)
    inputs = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values=pv, image_position_ids=ppos,
                  input_features=feats, input_features_mask=fmask)
    record_mm_forward(rec, "mm_mixed", m32, inputs,
                      "text + one image (2x3, P=8) + one audio clip (5 valid frames of 6) in one sequence", W)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def greedy_recompute(model, inputs: dict, n_new: int, suppress, eos_ids, mode: str):
    """Cache-free greedy reference: full forward over prompt+generated at each step (cross-check only)."""
    ids = inputs["input_ids"].astype(np.int64)
    am = inputs["attention_mask"].astype(bool)
    tt = inputs.get("mm_token_type_ids")
    B = ids.shape[0]
    done = np.zeros(B, bool)
    gen = []
    for _ in range(n_new):
        cur = dict(inputs)
        cur["input_ids"] = ids.astype(np.int32)
        cur["attention_mask"] = am
        cur["position_ids"] = generate_position_ids(am)
        if tt is not None:
            cur["mm_token_type_ids"] = np.concatenate([tt, np.zeros((B, ids.shape[1] - tt.shape[1]), np.int32)], 1)
        it = to_torch(cur)
        override = intended_masks(model, it) if mode == "intended" else None
        lg = torch.from_numpy(run_forward(model, it, override)[:, -1])
        lg[:, suppress] = -float("inf")
        nxt = lg.argmax(-1).numpy()
        nxt = np.where(done, 0, nxt)
        done |= np.isin(nxt, eos_ids)
        gen.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], 1)
        am = np.concatenate([am, np.ones((B, 1), bool)], 1)
        if done.all():
            break
    return np.stack(gen, 1)


def record_generation(rec, case, model, inputs, gen_cfg: dict, desc: str, cache_implementation=None,
                      recompute_mode="hf_forward"):
    check_inputs(inputs)
    it = to_torch(inputs)
    kw = dict(do_sample=False, max_new_tokens=gen_cfg["max_new_tokens"], suppress_tokens=gen_cfg["suppress_tokens"],
              pad_token_id=0, eos_token_id=gen_cfg["eos_token_id"], return_dict_in_generate=True, output_logits=True)
    if cache_implementation is not None:
        kw["cache_implementation"] = cache_implementation
    # Count calls of the class-level (spec 5.3) mask builder with mm_token_type_ids, to document which mask the
    # prefill really used.
    calls = []
    orig = Model.__dict__["create_masks_for_generate"]

    def counting(*a, **k):
        tt_ = k.get("mm_token_type_ids")
        # (query length, whether any vision token type is in the mm_token_type_ids it received)
        calls.append((int(k["inputs_embeds"].shape[1]), bool(tt_ is not None and ((tt_ == 1) | (tt_ == 2)).any())))
        return orig.__func__(*a, **k)

    Model.create_masks_for_generate = staticmethod(counting)
    try:
        with torch.no_grad():
            out = model.generate(**it, **kw)
    finally:
        Model.create_masks_for_generate = orig
    # With a static cache every step goes through the class-level builder; only the prefill sees vision types
    # (decode steps get mm_token_type_ids sliced to the new token, i.e. 0 -> no block overlay).
    n_class_calls_with_mm = sum(v for _, v in calls)
    if recompute_mode == "intended":
        assert calls and calls[0] == (inputs["input_ids"].shape[1], True) and n_class_calls_with_mm == 1, calls
    else:
        assert not calls, calls
    S = inputs["input_ids"].shape[1]
    seq = out.sequences.numpy()
    assert np.array_equal(seq[:, :S], inputs["input_ids"])
    generated = seq[:, S:].astype(np.int32)
    gen_logits = torch.stack(out.logits, 1).to(torch.float32).numpy()  # raw (pre-processor) logits per step
    B, n_new = generated.shape
    eos_hit = [bool(np.isin(generated[b], gen_cfg["eos_token_id"]).any()) for b in range(B)]
    # Cross-check with a cache-free greedy loop
    ref = greedy_recompute(model, inputs, n_new, gen_cfg["suppress_tokens"], gen_cfg["eos_token_id"], recompute_mode)
    agree = bool(ref.shape == generated.shape and np.array_equal(ref, generated))

    rec.inputs(case, inputs)
    rec.put(case, "generated", generated)
    rec.put(case, "gen_logits", gen_logits)
    rec.put(case, "prefill_position_ids", generate_position_ids(inputs["attention_mask"]))
    rec.meta(case, dict(
        kind="generate", dtype="float32", desc=desc,
        generate_kwargs=dict(do_sample=False, max_new_tokens=gen_cfg["max_new_tokens"],
                             suppress_tokens=gen_cfg["suppress_tokens"], pad_token_id=0,
                             eos_token_id=gen_cfg["eos_token_id"], cache_implementation=cache_implementation),
        prefill_mask=("intended (class-level create_masks_for_generate, static cache)" if recompute_mode == "intended"
                      else "hf_forward (Gemma4UnifiedModel.forward builds it; DynamicCache)"),
        position_ids_passed=False,
        prefill_position_ids="derived by generate(): cumsum(attention_mask)-1 with pads 0 (not passed; stored for "
                             "convenience); decode steps continue from the last position",
        generated="new tokens only [B, new]; rows that emitted an eos id are padded with pad_token_id 0 afterwards",
        gen_logits="raw model logits at each generation step [B, new, V] (before suppress_tokens)",
        eos_hit=eos_hit,
        class_create_masks_for_generate_calls=len(calls),
        class_create_masks_for_generate_calls_with_vision_types=n_class_calls_with_mm,
        cache_free_greedy_agrees=agree))
    rec.rows.append((case, "float32", inputs["input_ids"].shape, float(np.abs(gen_logits).max()),
                     f"gen={generated.tolist()[0][:8]}.. eos_hit={eos_hit} recompute_agrees={agree}"))
    return agree


def record_gen_cases(rec, spec, b: Builder, m32, gen_cfg, multimodal: bool):
    ids, am, _ = b.batch([[("bos",), ("text", 9)]])
    record_generation(rec, "gen_text", m32, dict(input_ids=ids, attention_mask=am), gen_cfg,
                      "one text prompt of length 10 (attention_mask all ones -> generate drops it)")

    ids, am, _ = b.batch([[("bos",), ("text", 11)], [("bos",), ("text", 7)], [("bos",), ("text", 4)]])
    record_generation(rec, "gen_left_pad", m32, dict(input_ids=ids, attention_mask=am), gen_cfg,
                      "3 text prompts of lengths 12, 8, 5, left-padded to 12")

    if not multimodal:
        return
    ids, am, tt = b.batch([[("bos",), ("text", 3), ("image", 9), ("text", 4)]])
    pv, ppos = b.images([(3, 3)], P=12)
    img_inputs = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values=pv, image_position_ids=ppos)
    record_generation(rec, "gen_image", m32, img_inputs, gen_cfg,
                      "image prompt (3x3 grid, P=12); cache_implementation='static' so generate() routes the prefill "
                      "mask through the class-level create_masks_for_generate (spec 5.3)",
                      cache_implementation="static", recompute_mode="intended")
    record_generation(rec, "gen_image_dynamic", m32, img_inputs, gen_cfg,
                      "same inputs as gen_image with the default DynamicCache: the prefill uses the bare-forward mask "
                      "(bidirectional image block on full layers too, spec 5.4)", recompute_mode="hf_forward")

    ids, am, tt = b.batch([[("bos",), ("text", 3), ("audio", 8), ("text", 3)]])
    feats, fmask = b.audio([8], F=10)
    record_generation(rec, "gen_audio", m32, dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt,
                                                  input_features=feats, input_features_mask=fmask), gen_cfg,
                      "audio prompt (8 valid frames of 10)")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def save_checkpoint(model, cfg_spec, ckpt_dir: str, gen_cfg: dict):
    os.makedirs(ckpt_dir, exist_ok=True)
    model.save_pretrained(ckpt_dir, safe_serialization=True)
    # transformers 5.24 serialises the full-layer overrides only as text_config.per_layer_config; the real
    # google/gemma-4-12B config.json carries global_head_dim / num_global_key_value_heads. Add them (HF's
    # __post_init__ pops both and keeps per_layer_config, so the reload is unchanged - verified below).
    path = os.path.join(ckpt_dir, "config.json")
    with open(path) as f:
        cj = json.load(f)
    cj["text_config"]["global_head_dim"] = cfg_spec["global_head_dim"]
    cj["text_config"]["num_global_key_value_heads"] = 1
    with open(path, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")
    gc = GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=gen_cfg["eos_token_id"],
                          suppress_tokens=gen_cfg["suppress_tokens"])
    gc.save_pretrained(ckpt_dir)


def safetensors_listing(path: str):
    from safetensors import safe_open

    rows = []
    with safe_open(path, "pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            rows.append((k, sl.get_dtype(), list(sl.get_shape())))
    return rows


def process_checkpoint(name: str, spec: dict, out_dir: str):
    seed = spec["seed"]
    torch.manual_seed(seed)
    cfg = build_config(spec)
    cfg._attn_implementation = "eager"
    model = Model(cfg).to(torch.float32).eval()
    pinfo = perturb_weights(model, seed)

    V = spec["vocab_size"]
    sid = special_ids(V)
    eos = [1] + ([106] if 106 < V else [])
    gen_cfg = dict(eos_token_id=eos, suppress_tokens=[sid["eoa_token_index"], sid["eoi_token_id"]], max_new_tokens=20)

    case_dir = os.path.join(out_dir, name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    ckpt_dir = os.path.join(case_dir, "checkpoint")
    save_checkpoint(model, spec, ckpt_dir, gen_cfg)

    # Reload from disk: the references are computed with the round-tripped checkpoint.
    m32 = Model.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval()
    sd0, sd1 = model.state_dict(), m32.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), f"round-trip mismatch {k}"
    for i, lt in enumerate(m32.config.text_config.layer_types):
        a0 = model.model.language_model.layers[i].self_attn
        a1 = m32.model.language_model.layers[i].self_attn
        assert (a0.head_dim, a0.num_key_value_groups) == (a1.head_dim, a1.num_key_value_groups)
        assert (a1.v_proj is None) == (lt == "full_attention")
    m16_load = Model.from_pretrained(ckpt_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    m16_cast = Model.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval()
    m16_cast = m16_cast.to(torch.bfloat16)
    assert m16_load.model.language_model.rotary_emb.sliding_attention_inv_freq.dtype == torch.float32
    assert m16_cast.model.language_model.rotary_emb.sliding_attention_inv_freq.dtype == torch.bfloat16

    rng = np.random.default_rng(seed)
    b = Builder(V, rng)
    rec = Recorder()
    m64 = Model.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval().to(torch.float64)
    frac_capped = record_text_cases(rec, name, spec, b, m32, m16_load, m16_cast, m64)
    if spec["multimodal_cases"]:
        record_mm_cases(rec, spec, b, m32)
    record_gen_cases(rec, spec, b, m32, gen_cfg, spec["multimodal_cases"])

    tensors = safetensors_listing(os.path.join(ckpt_dir, "model.safetensors"))
    info = dict(
        checkpoint=name,
        seed=seed,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        attn_implementation="eager",
        spec={k: v for k, v in spec.items() if k != "seed"},
        special_ids=sid,
        generation=gen_cfg,
        perturbation=dict(
            embed_tokens=f"N(0, {EMBED_STD}^2) (all rows, tied lm_head)",
            rmsnorm=f"weight = gain*(1 + {NORM_STD} randn); gain {POST_NORM_GAIN} for post_attention/"
                    f"post_feedforward_layernorm, {QK_NORM_GAIN} for q_norm/k_norm, 1 for input/pre_feedforward/final",
            linear="N(0, 1/in_features); patch_dense bias N(0, 0.1^2)",
            layernorm="weight 1 + 0.3 randn, bias N(0, 0.2^2)",
            pos_embedding="N(0, 0.5^2)",
            layer_scalar=pinfo["layer_scalars"],
        ),
        fraction_text_long_abs_logits_above_10=frac_capped[0],
        fraction_text_long_abs_logits_above_half_cap=frac_capped[1],
        safetensors=[dict(name=k, dtype=d, shape=s) for k, d, s in tensors],
    )
    rec.put("_info", "meta", np.array(json.dumps(info, sort_keys=True)))
    npz_path = os.path.join(case_dir, "cases.npz")
    np.savez_compressed(npz_path, **rec.arrays)

    print(f"\n=== {name}  (V={V}, hidden={spec['hidden_size']}, layers={spec['num_hidden_layers']}, "
          f"window={spec['sliding_window']}, softcap={spec['final_logit_softcapping']})")
    print(f"{'case':<20} {'dtype':<9} {'input_ids':<10} {'max|logit|':>10}  notes")
    for case, dt, shape, mx, note in rec.rows:
        print(f"{case:<20} {dt:<9} {str(tuple(shape)):<10} {mx:>10.3f}  {note or ''}")
    print(f"text_long: fraction of |logit| > 10 = {frac_capped[0]:.3f}, > cap/2 = {frac_capped[1]:.3f}; "
          f"max |fp32 - fp64| text_long {json.loads(str(rec.arrays['text_long/meta']))['max_abs_diff_vs_fp64']:.2e}")
    print(f"safetensors: {len(tensors)} tensors, dtypes {sorted(set(d for _, d, _ in tensors))}; "
          f"checkpoint {os.path.getsize(os.path.join(ckpt_dir, 'model.safetensors'))/1e6:.2f} MB; "
          f"cases.npz {os.path.getsize(npz_path)/1e6:.2f} MB ({len(rec.arrays)} arrays)")


# ---------------------------------------------------------------------------------------------
# bf16 module trace (--bf16-trace): every decoder submodule's bf16 input and output
# ---------------------------------------------------------------------------------------------
TRACE_FILE = "bf16_trace.npz"
# checkpoint -> (cases, number of leading layers traced). bf16 bit patterns compress only to ~73%, so a full trace
# of tiny_b (12 layers, 96-wide, both cases) is 8.4 MB; its trace keeps text_long_bf16 over the first period
# (5 sliding + 1 full layer), ~2.1 MB. tiny_a and tiny_c: everything, ~1.4 MB each.
TRACE_PLAN = {
    "tiny_a": (("text_long_bf16", "left_pad_bf16"), 6),
    "tiny_b": (("text_long_bf16",), 6),
    "tiny_c": (("text_long_bf16", "left_pad_bf16"), 6),
}


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor as its uint16 bit patterns (a copy: hooks see tensors that later code may reuse)."""
    assert t.dtype == torch.bfloat16, t.dtype
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).copy()


class TraceStore:
    """Arrays by key, each distinct content stored once; a repeat becomes an alias `key -> [stored key, shape]`."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.aliases: dict[str, list] = {}
        self._by_content: dict[tuple, str] = {}

    def put(self, key: str, arr: np.ndarray):
        assert key not in self.arrays and key not in self.aliases, key
        content = (arr.dtype.str, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
        first = self._by_content.get(content)
        if first is not None and np.array_equal(self.arrays[first].reshape(-1), arr.reshape(-1)):
            self.aliases[key] = [first, list(arr.shape)]
        else:
            self.arrays[key] = arr
            self._by_content[content] = key


def trace_case(model, store: TraceStore, case: str, inputs: dict, n_layers: int) -> np.ndarray:
    """One bf16 forward with hooks on `layers.<i>` and its submodules (up to `layers.<i>.<a>.<b>`), i < n_layers.

    Records `<case>/<module>|in` and `|out` (first positional argument or `hidden_states=`, first output), and the
    eager attention core's `<case>/layers.<i>.self_attn.core|{q,k,v,mask,out}`. Returns the logits (float32).
    """
    lm = model.model.language_model
    handles = []

    def hook(name):
        def record(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            store.put(f"{case}/{name}|in", bf16_bits(x))
            store.put(f"{case}/{name}|out", bf16_bits(out[0] if isinstance(out, tuple) else out))
        return record

    for name, mod in lm.named_modules():
        parts = name.split(".")
        if parts[0] == "layers" and 2 <= len(parts) <= 4 and int(parts[1]) < n_layers:
            handles.append(mod.register_forward_hook(hook(name), with_kwargs=True))

    eager = mg.eager_attention_forward

    def traced_eager(module, query, key, value, attention_mask, **kw):
        out, weights = eager(module, query, key, value, attention_mask, **kw)
        if module.layer_idx < n_layers:
            p = f"{case}/layers.{module.layer_idx}.self_attn.core"
            # HF's [B, heads, T, D] -> [B, T, heads, D], the layout of q_norm's output and of our modules
            store.put(f"{p}|q", bf16_bits(query.transpose(1, 2)))
            store.put(f"{p}|k", bf16_bits(key.transpose(1, 2)))
            store.put(f"{p}|v", bf16_bits(value.transpose(1, 2)))
            m = attention_mask[:, 0]
            lowest = torch.finfo(m.dtype).min
            assert bool(((m == 0) | (m == lowest)).all()), "additive mask holds values other than 0 and min"
            store.put(f"{p}|mask", (m == 0).numpy())
            store.put(f"{p}|out", bf16_bits(out))
        return out, weights

    mg.eager_attention_forward = traced_eager
    try:
        with torch.no_grad():
            logits = model(**to_torch(inputs), use_cache=False).logits
    finally:
        mg.eager_attention_forward = eager
        for h in handles:
            h.remove()
    return logits.to(torch.float32).numpy()


def trace_checkpoint(name: str, out_dir: str):
    """Write `<out>/<name>/bf16_trace.npz` from the existing checkpoint and cases (rebuilds nothing)."""
    case_dir = os.path.join(out_dir, name)
    ckpt_dir = os.path.join(case_dir, "checkpoint")
    cases = np.load(os.path.join(case_dir, "cases.npz"))
    model = Model.from_pretrained(ckpt_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    trace_cases, n_layers = TRACE_PLAN[name]
    store = TraceStore()
    for case in trace_cases:
        fields = [k.split("/", 1)[1] for k in cases.files if k.startswith(case + "/")]
        inputs = {f: cases[f"{case}/{f}"] for f in fields if f in ("input_ids", "attention_mask", "position_ids")}
        check_inputs(inputs)
        logits = trace_case(model, store, case, inputs, n_layers)
        # the traced run is the run whose logits cases.npz holds
        assert np.array_equal(logits, cases[f"{case}/logits"]), f"{name}/{case}: logits differ from cases.npz"
        ids = inputs["input_ids"]
        pos = inputs.get("position_ids", np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
        store.put(f"{case}/position_ids", np.ascontiguousarray(pos, np.int32))
        store.put(f"{case}/attention_mask", inputs["attention_mask"])
    info = dict(checkpoint=name, cases=list(trace_cases), layers=n_layers,
                layer_types=list(model.config.text_config.layer_types[:n_layers]),
                transformers_version=transformers.__version__, torch_version=torch.__version__,
                attn_implementation="eager", dtype="bfloat16 (from_pretrained(..., dtype=torch.bfloat16))")
    path = os.path.join(case_dir, TRACE_FILE)
    np.savez_compressed(path, **store.arrays, _aliases=np.array(json.dumps(store.aliases, sort_keys=True)),
                        _info=np.array(json.dumps(info, sort_keys=True)))
    print(f"{name}: {path} {os.path.getsize(path) / 1e6:.2f} MB, {len(store.arrays)} arrays + "
          f"{len(store.aliases)} aliases")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/hf")
    ap.add_argument("--only", nargs="*", default=None, help="subset of checkpoint names")
    ap.add_argument("--bf16-trace", action="store_true",
                    help=f"only write <out>/<name>/{TRACE_FILE} from the existing checkpoints and cases")
    args = ap.parse_args()
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        print(f"WARNING: transformers {transformers.__version__} != {EXPECTED_TRANSFORMERS} used for the committed "
              "fixtures", file=sys.stderr)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    for name, spec in CHECKPOINTS.items():
        if args.only and name not in args.only:
            continue
        if args.bf16_trace:
            trace_checkpoint(name, args.out)
        else:
            process_checkpoint(name, spec, args.out)


if __name__ == "__main__":
    main()
