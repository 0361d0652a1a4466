#!/usr/bin/env python
"""Record transformers' `Gemma4UnifiedAssistantForCausalLM` (the Gemma 4 MTP drafter) on small random checkpoints.

The target is the recorded random checkpoint `tests/fixtures/hf/tiny_a/checkpoint` (the real 12B structure at toy
sizes: 5 sliding + 1 full layer, sliding window 8, k_eq_v full layers with one KV head). Two random drafters with
the real drafter structure are built beside it: 4 layers (3 sliding + 1 full), every layer reading the KV of the
target's last sliding / last full layer, a `pre_projection` from [target token embedding, target hidden state], a
`post_projection` back, tied logits; one with `use_ordered_embeddings=True` (the centroid-masked embedder with a
random `token_ordering` permutation), one without. Norm weights, layer scalars and every projection are perturbed
away from their defaults. Eager attention, fp32.

Usage (deterministic; overwrites the output folder)::

    /work/venv-hf/bin/python scripts/record_hf_assistant.py --out tests/fixtures/hf_assistant

Layout written::

    <out>/<drafter>/checkpoint/{config.json, model.safetensors, generation_config.json}
    <out>/<drafter>/cases.npz   keys:
        "<case>/input_ids" i32 [L]   the target's prompt (one row; "<case>/attention_mask" bool [L], False = pad)
        "<case>/first_token" i32 []   the target's greedy token after the prompt (the drafter's first input)
        "<case>/draft_tokens" i32 [k]  the drafter's own greedy tokens (each fed back as the next input)
        "<case>/logits" f32 [k, V]    the drafter's logits at each of the k draft steps
        "<case>/projected" f32 [k, backbone_hidden]   its `last_hidden_state` (post_projection) at each step
        "<case>/position" i32 []      the position_ids given to the drafter (the first token's position)
        "gen_<case>/input_ids", "gen_<case>/target_greedy", "gen_<case>/assisted_greedy"   i32: prompt and the
            new tokens of `generate(do_sample=False)` without / with `assistant_model=` (transformers accepts this
            drafter for batch 1; the two agree as greedy speculative decoding must)
        "_info/meta"   0-d JSON (versions, configs, k)

How the drafter is driven (transformers' `SinglePositionMultiTokenCandidateGenerator`): the target runs over the
prompt with `return_shared_kv_states=True`; its final-norm hidden state at the last prompt token and the KV of its
last sliding and last full layer feed the drafter; the first input is [embed(first token) * sqrt(hidden), that
hidden state], at position = the first token's position; each further step feeds [embed(drafted token), the
drafter's own `last_hidden_state`] at the same position, with the same KV.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from torch import nn
from transformers.models.gemma4_unified import modeling_gemma4_unified as mg
from transformers.models.gemma4_unified_assistant import modeling_gemma4_unified_assistant as ma
from transformers.models.gemma4_unified_assistant.configuration_gemma4_unified_assistant import (
    Gemma4UnifiedAssistantConfig,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny_a", "checkpoint")
EXPECTED_TRANSFORMERS = "5.24.0"
K = 3  # draft steps recorded per case

DRAFTERS = {
    "ordered": dict(seed=2001, hidden_size=32, intermediate_size=48, num_attention_heads=4, use_ordered=True,
                    num_centroids=16, top_k=4, double_wide=True),
    "plain": dict(seed=2002, hidden_size=40, intermediate_size=64, num_attention_heads=2, use_ordered=False,
                  num_centroids=2048, top_k=32, double_wide=False),
}


def drafter_config(target_cfg, spec) -> Gemma4UnifiedAssistantConfig:
    t = target_cfg.text_config
    full = next(i for i, lt in enumerate(t.layer_types) if lt == "full_attention")
    sliding = t.layer_types.index("sliding_attention")
    text = dict(
        model_type="gemma4_unified_text",
        vocab_size=t.vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=t.per_layer_config[sliding].num_key_value_heads,
        head_dim=t.per_layer_config[sliding].head_dim,
        global_head_dim=t.per_layer_config[full].head_dim,
        num_global_key_value_heads=t.per_layer_config[full].num_key_value_heads,
        attention_k_eq_v=True,
        sliding_window=t.sliding_window,
        final_logit_softcapping=t.final_logit_softcapping,
        rope_parameters=t.rope_parameters,
        use_bidirectional_attention="vision",
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        max_position_embeddings=t.max_position_embeddings,
        num_kv_shared_layers=4,
        use_double_wide_mlp=spec["double_wide"],
        attention_bias=False,
        attention_dropout=0.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma4UnifiedAssistantConfig(text_config=text, backbone_hidden_size=t.hidden_size,
                                        use_ordered_embeddings=spec["use_ordered"], num_centroids=spec["num_centroids"],
                                        centroid_intermediate_top_k=spec["top_k"], tie_word_embeddings=True)


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=g, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, mg.Gemma4UnifiedRMSNorm) and mod.with_scale:
                gain = 3.0 if ("post_attention" in name or "post_feedforward" in name) else (
                    0.4 if name.endswith("q_norm") else 1.0)
                mod.weight.copy_(gain * (1.0 + 0.3 * randn(mod.weight.shape)))
            elif isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(randn(mod.weight.shape) / math.sqrt(mod.in_features))
            elif isinstance(mod, mg.Gemma4UnifiedTextScaledWordEmbedding):
                mod.weight.copy_(0.6 * randn(mod.weight.shape))
        for layer, v in zip(model.model.layers, 0.5 + torch.rand(len(model.model.layers), generator=g)):
            layer.layer_scalar.copy_(v.reshape(1))
        if model.masked_embedding is not None:
            perm = torch.randperm(model.vocab_size, generator=g)
            model.masked_embedding.token_ordering.copy_(perm)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"


def draft_chain(target, drafter, ids: torch.Tensor, am: torch.Tensor, k: int) -> dict:
    """One target forward over the prompt, then k drafter steps (as the candidate generator runs them)."""
    L = ids.shape[1]
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = target(input_ids=ids, attention_mask=am.long(), position_ids=pos, output_hidden_states=True,
                     return_shared_kv_states=True, use_cache=True)
        first = out.logits[0, -1].argmax()
        hidden = out.hidden_states[-1][:, -1:]
        shared = {kk: (v[0], v[1]) for kk, v in out.shared_kv_states.items()}
        embed = target.get_input_embeddings()
        token = first.reshape(1, 1)
        position = torch.tensor([[int(pos[0, -1]) + 1]])
        mask = torch.cat([am.long(), torch.ones((1, 1), dtype=torch.long)], 1)
        logits, projected, tokens = [], [], []
        for _ in range(k):
            o = drafter(inputs_embeds=torch.cat([embed(token), hidden], -1), attention_mask=mask,
                        position_ids=position, shared_kv_states=shared, use_cache=False)
            logits.append(o.logits[0, 0].numpy())
            projected.append(o.last_hidden_state[0, 0].numpy())
            token = o.logits.argmax(-1)
            hidden = o.last_hidden_state
            tokens.append(int(token))
    return dict(input_ids=ids[0].numpy().astype(np.int32), attention_mask=am[0].numpy(),
                first_token=np.int32(first), draft_tokens=np.array(tokens, np.int32),
                logits=np.stack(logits).astype(np.float32), projected=np.stack(projected).astype(np.float32),
                position=np.int32(position[0, 0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "hf_assistant"))
    args = ap.parse_args()
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        sys.exit(f"expected transformers {EXPECTED_TRANSFORMERS}, found {transformers.__version__}")
    target = mg.Gemma4UnifiedForConditionalGeneration.from_pretrained(
        TARGET, dtype=torch.float32, attn_implementation="eager").eval()
    V = target.config.text_config.vocab_size
    rng = np.random.default_rng(7)
    prompts = {  # (length, pads): shorter than the window (8), longer, several windows, left-padded
        "short": (5, 0), "window": (9, 0), "long": (21, 0), "padded": (13, 4)}
    inputs = {}
    for case, (n, pads) in prompts.items():
        ids = np.concatenate([[2], rng.integers(3, V - 8, size=n - 1)]).astype(np.int64)
        ids = np.concatenate([np.zeros(pads, np.int64), ids])
        am = np.concatenate([np.zeros(pads, bool), np.ones(n, bool)])
        inputs[case] = (torch.from_numpy(ids)[None], torch.from_numpy(am)[None])
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    for name, spec in DRAFTERS.items():
        torch.manual_seed(spec["seed"])
        cfg = drafter_config(target.config, spec)
        cfg._attn_implementation = "eager"
        drafter = ma.Gemma4UnifiedAssistantForCausalLM(cfg).to(torch.float32).eval()
        perturb(drafter, spec["seed"])
        ckpt = os.path.join(args.out, name, "checkpoint")
        drafter.generation_config.num_assistant_tokens = K
        drafter.generation_config.num_assistant_tokens_schedule = "constant"
        drafter.save_pretrained(ckpt, safe_serialization=True)
        drafter = ma.Gemma4UnifiedAssistantForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="eager").eval()
        arrays = {}
        for case, (ids, am) in inputs.items():
            for key, value in draft_chain(target, drafter, ids, am, K).items():
                arrays[f"{case}/{key}"] = value
        # generate() with the assistant (batch 1, no padding: what transformers' assisted decoding accepts)
        for case in ("short", "long"):
            ids, am = inputs[case]
            with torch.no_grad():
                plain = target.generate(ids, attention_mask=am.long(), do_sample=False, max_new_tokens=12,
                                        eos_token_id=None, pad_token_id=0, suppress_tokens=None)
                assisted = target.generate(ids, attention_mask=am.long(), do_sample=False, max_new_tokens=12,
                                           eos_token_id=None, pad_token_id=0, suppress_tokens=None,
                                           assistant_model=drafter)
            arrays[f"gen_{case}/input_ids"] = ids[0].numpy().astype(np.int32)
            arrays[f"gen_{case}/target_greedy"] = plain[0, ids.shape[1]:].numpy().astype(np.int32)
            arrays[f"gen_{case}/assisted_greedy"] = assisted[0, ids.shape[1]:].numpy().astype(np.int32)
            assert torch.equal(plain, assisted), (name, case, plain, assisted)
        info = dict(transformers_version=transformers.__version__, torch_version=torch.__version__, k=K,
                    target="tests/fixtures/hf/tiny_a/checkpoint", spec=spec, attn_implementation="eager")
        arrays["_info/meta"] = np.array(json.dumps(info, sort_keys=True))
        np.savez_compressed(os.path.join(args.out, name, "cases.npz"), **arrays)
        size = os.path.getsize(os.path.join(ckpt, "model.safetensors"))
        print(f"{name}: {sum(p.numel() for p in drafter.parameters())} parameters, checkpoint {size / 1e3:.0f} kB; "
              f"draft tokens {[arrays[f'{c}/draft_tokens'].tolist() for c in inputs]}; "
              f"first tokens {[int(arrays[f'{c}/first_token']) for c in inputs]}")


if __name__ == "__main__":
    main()
