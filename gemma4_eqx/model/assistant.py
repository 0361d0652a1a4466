"""The Gemma 4 assistant (multi-token-prediction drafter): transformers' `Gemma4UnifiedAssistantForCausalLM`
(`model_type` `gemma4_unified_assistant`, e.g. `google/gemma-4-12B-it-assistant`) as an Equinox module.

What one draft step computes (one sequence, one query token):

1. The input is the target's scaled embedding of the last seen token (the token whose key is *not* yet in the
   target's cache) concatenated with a state of width `backbone_hidden_size`: for the first step the target's
   final-norm hidden state that predicted that token, afterwards the drafter's own `projected` output.
   `pre_projection` maps the `2 * backbone_hidden_size` vector to the drafter's width.
2. Every decoder layer (all of them "KV-shared": no key/value projections, no own cache) computes queries only
   (q_proj, q_norm, RoPE at the last seen token's position; the position does not advance inside a draft round),
   and attends over the keys and values of the target's *last* layer of its own kind: sliding layers over the last
   sliding layer's ring, the full layer over the last full layer's keys. Which cache slots it sees (transformers'
   bidirectional masks, flipped so that the window looks back): full layers every real slot before the token;
   sliding layers the `sliding_window + 1` slots before it (a distance <= window, inclusive), padding excluded.
   Otherwise a layer is the target's: sandwich norms, GeGLU MLP (twice as wide under `use_double_wide_mlp`),
   `layer_scalar`.
3. The final norm; `post_projection` of it is the state fed to the next step; the logits are the tied embedding
   product (no soft cap), or with `use_ordered_embeddings` the centroid-masked embedder: the `top_k` highest of
   `num_centroids` centroid logits select `top_k` groups of `vocab / num_centroids` tokens (group g is
   `token_ordering[g * size:(g + 1) * size]`); those tokens get their tied-embedding logit, every other token the
   smallest selected logit minus one.

transformers computes the masked fill value over the whole batch tensor; here it is per sequence (transformers'
assisted decoding runs batch 1, where the two agree). One difference in how the drafter is *driven*, not in what
it computes: after a round in which the target rejected a draft, transformers' candidate generator slices the
target's returned KV to the new sequence length, which keeps the key of the first rejected draft at the slot of
the pending token (and its sliding-layer states are not trimmed at all once the context exceeds the window);
here the drafter reads the target's cache truncated to the accepted tokens, i.e. exactly the context a round
after full acceptance (or the first round) sees in transformers. Both give the target's output; acceptance can
differ slightly.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import FULL, SLIDING
from ..config.assistant import AssistantConfig
from ..layers.cache import FullKV, RawKeyKV, RingKV
from ..layers.decoder import slice_layer
from ..layers.kinds import LayerKind
from ..layers.linear import AbstractLinear, Linear
from ..layers.mlp import MLP
from ..layers.norm import RMSNorm
from ..layers.policy import XLA, AttentionKernel, Numerics, Policy, XLAKernel
from ..layers.rope import inv_frequencies, rope_cos_sin
from .cache import KVCache
from .drafter import AbstractDrafter


# ---- the target's KV as the drafter reads it ---------------------------------------------------------------
class SharedKV(eqx.Module):
    """The keys, values and visibility (for the next draft query) of the target's last sliding and full layer."""

    sliding_k: Float[Array, "ring kv_heads head_dim"]
    sliding_v: Float[Array, "ring kv_heads head_dim"]
    sliding_mask: Bool[Array, " ring"]
    full_k: Float[Array, "slots kv_heads_full head_dim_full"]
    full_v: Float[Array, "slots kv_heads_full head_dim_full"]
    full_mask: Bool[Array, " slots"]
    position: Int[Array, ""]  # RoPE position of the draft query (the last seen token's)


def _cache_entry(target, cache: KVCache, layer_idx: int):
    stack = target.layers
    run, repeat, slot = stack.locate(layer_idx) if stack.cache_slots is None else stack.cache_slots[layer_idx]
    return slice_layer(cache.layers[run], repeat, slot)


def shared_kv(target, cache: KVCache, window: int) -> SharedKV:
    """What the drafter attends over when the target's cache holds every token before the last seen one (one
    sequence). `window`: the drafter's sliding window; its sliding layers see `window + 1` slots."""
    types = target.config.text.layer_types
    sliding = _cache_entry(target, cache, AssistantConfig.shared_kv_layer(types, SLIDING))
    full_idx = AssistantConfig.shared_kv_layer(types, FULL)
    full = _cache_entry(target, cache, full_idx)
    if not isinstance(sliding, RingKV):
        raise TypeError(f"the target's last sliding layer has a {type(sliding).__name__} cache entry; expected RingKV")
    slots = jnp.arange(cache.max_len)
    full_mask = cache.full_valid & (slots < cache.length)
    if isinstance(full, RawKeyKV):
        attn = target.layers.layer(full_idx).self_attn
        full_k, full_v = attn.finish_kv(full.raw, None, cache.full_positions)
    elif isinstance(full, FullKV):
        full_k, full_v = full.k, full.v
    else:
        raise TypeError(f"the target's last full layer has a {type(full).__name__} cache entry")
    ring = cache.ring_slots
    sliding_mask = cache.ring_valid & (ring >= 0) & (ring < cache.length) & (ring >= cache.length - window - 1)
    return SharedKV(sliding.k, sliding.v, sliding_mask, full_k, full_v, full_mask, cache.next_position)


# ---- the module --------------------------------------------------------------------------------------------
class AssistantLayer(eqx.Module):
    """One KV-shared decoder layer: queries only, attending over the target's keys and values. Its numerics and
    attention kernel are policies, as the decoder layer's (`g4.with_policy` swaps them through the assistant too)."""

    q_proj: AbstractLinear
    q_norm: RMSNorm
    o_proj: AbstractLinear
    mlp: MLP
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    pre_feedforward_layernorm: RMSNorm
    post_feedforward_layernorm: RMSNorm
    layer_scalar: Float[Array, "1"]
    numerics: Numerics
    kernel: AttentionKernel
    kind: LayerKind = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(self, config: AssistantConfig, kind: str, *, key: PRNGKeyArray, dtype=jnp.float32,
                 numerics: Numerics = XLA(), kernel: AttentionKernel = XLAKernel()):
        t = config.text
        g = t.layer_geometry_for_type(kind)
        kq, ko, km = jax.random.split(key, 3)
        d, std, eps = t.hidden_size, t.initializer_range, t.rms_norm_eps
        self.q_proj = Linear(d, t.num_attention_heads * g.head_dim, key=kq, std=std, dtype=dtype, numerics=numerics)
        self.q_norm = RMSNorm(g.head_dim, eps=eps, dtype=dtype, numerics=numerics)
        self.o_proj = Linear(t.num_attention_heads * g.head_dim, d, key=ko, std=std, dtype=dtype, numerics=numerics)
        self.mlp = MLP(d, config.mlp_width, key=km, std=std, dtype=dtype, numerics=numerics)
        norm = lambda: RMSNorm(d, eps=eps, dtype=dtype, numerics=numerics)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.layer_scalar = jnp.ones((1,), dtype)
        self.numerics, self.kernel = numerics, kernel
        self.kind = LayerKind(kind)
        self.num_heads, self.head_dim = t.num_attention_heads, g.head_dim

    def refuses(self, policy: Policy) -> str | None:
        """The numerics and kernel policies must agree, as in the decoder's attention."""
        if isinstance(policy, Numerics):
            return policy.refuses_kernel(self.kernel)
        if isinstance(policy, AttentionKernel):
            return self.numerics.refuses_kernel(policy)
        return None

    def __call__(
        self,
        h: Float[Array, "1 hidden"],
        position: Int[Array, ""],
        rope: Any,
        k: Float[Array, "keys kv_heads head_dim"],
        v: Float[Array, "keys kv_heads head_dim"],
        mask: Bool[Array, " keys"],
    ) -> Float[Array, "1 hidden"]:
        x = self.input_layernorm(h)
        q = self.q_norm(self.q_proj(x).reshape(1, self.num_heads, self.head_dim))
        cos, sin = rope_cos_sin(position.reshape(1), inv_frequencies(rope, self.head_dim), x.dtype)
        q = self.numerics.rope(q, cos, sin)
        a = self.numerics.attend(q, k.astype(x.dtype), v.astype(x.dtype), mask[None], None, self.kernel)
        a = self.o_proj(a.reshape(1, self.num_heads * self.head_dim))
        h = h + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar.astype(h.dtype)


class Assistant(AbstractDrafter):
    """`Gemma4UnifiedAssistantForCausalLM` as an immutable pytree (one sequence, one query per call)."""

    embed_tokens: Float[Array, "vocab hidden"]
    layers: tuple[AssistantLayer, ...]
    norm: RMSNorm
    pre_projection: Linear  # [2 * backbone, hidden]: [target token embedding, target state] -> hidden
    post_projection: Linear  # [hidden, backbone]
    centroids: Linear | None  # [hidden, num_centroids] (use_ordered_embeddings)
    token_ordering: Int[Array, " vocab"] | None
    config: AssistantConfig = eqx.field(static=True)
    token_ordering_dtype: str = eqx.field(static=True, default="I64")  # as stored on disk (bit-exact save)

    def __init__(self, config: AssistantConfig, *, key: PRNGKeyArray, dtype=jnp.float32,
                 token_ordering_dtype: str = "I64"):
        t = config.text
        ke, kl, kp, kq, kc, ko = jax.random.split(key, 6)
        std = t.initializer_range
        self.config = config
        self.embed_tokens = (std * jax.random.normal(ke, (t.vocab_size, t.hidden_size))).astype(dtype)
        self.layers = tuple(AssistantLayer(config, kind, key=k, dtype=dtype)
                            for kind, k in zip(t.layer_types, jax.random.split(kl, t.num_hidden_layers)))
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype)
        b = config.backbone_hidden_size
        self.pre_projection = Linear(2 * b, t.hidden_size, key=kp, std=std, dtype=dtype)
        self.post_projection = Linear(t.hidden_size, b, key=kq, std=std, dtype=dtype)
        if config.use_ordered_embeddings:
            self.centroids = Linear(t.hidden_size, config.num_centroids, key=kc, std=std, dtype=dtype)
            self.token_ordering = jax.random.permutation(ko, t.vocab_size).astype(jnp.int32)
        else:
            self.centroids = self.token_ordering = None
        self.token_ordering_dtype = token_ordering_dtype

    @property
    def dtype(self):
        return self.embed_tokens.dtype

    def check_target(self, target) -> None:
        """The drafter reads the target's KV and states: their geometry must agree (raises ValueError naming the
        field)."""
        a, t = self.config.text, target.config.text
        if self.config.backbone_hidden_size != t.hidden_size:
            raise ValueError(f"assistant: backbone_hidden_size {self.config.backbone_hidden_size} differs from the "
                             f"target's hidden_size {t.hidden_size}")
        if a.vocab_size != t.vocab_size:
            raise ValueError(f"assistant: vocab_size {a.vocab_size} differs from the target's {t.vocab_size}")
        for kind in set(a.layer_types):
            ga, gt = a.layer_geometry_for_type(kind), t.layer_geometry_for_type(kind)
            if (ga.num_key_value_heads, ga.head_dim) != (gt.num_key_value_heads, gt.head_dim):
                raise ValueError(f"assistant: its {kind} layers expect {ga.num_key_value_heads} KV heads of "
                                 f"{ga.head_dim}, the target's hold {gt.num_key_value_heads} of {gt.head_dim}")
        if a.sliding_window > t.sliding_window:
            raise ValueError(f"assistant: sliding_window {a.sliding_window} exceeds the target's {t.sliding_window}")

    def logits_from_hidden(self, h: Float[Array, " hidden"]) -> Float[Array, " vocab"]:
        """Tied logits (no soft cap), or the centroid-masked ones under `use_ordered_embeddings`."""
        emb = self.embed_tokens.astype(h.dtype)
        if self.centroids is None:
            return emb @ h
        cfg = self.config
        _, top = jax.lax.top_k(self.centroids(h), cfg.centroid_intermediate_top_k)
        groups = self.token_ordering.reshape(cfg.num_centroids, cfg.tokens_per_centroid)
        chosen = groups[top].reshape(-1)
        selected = emb[chosen] @ h
        fill = jnp.min(selected) - 1.0
        return jnp.full((cfg.text.vocab_size,), fill, h.dtype).at[chosen].set(selected)

    def step(
        self,
        token_embedding: Float[Array, " backbone"],
        state: Float[Array, " backbone"],
        kv: SharedKV,
    ) -> tuple[Float[Array, " vocab"], Float[Array, " backbone"]]:
        """One draft step: (logits, projected state for the next step)."""
        t = self.config.text
        x = jnp.concatenate([token_embedding, state]).astype(self.dtype)
        h = self.pre_projection(x)[None]
        for layer in self.layers:
            if layer.kind == LayerKind.SLIDING:
                h = layer(h, kv.position, t.rope_sliding, kv.sliding_k, kv.sliding_v, kv.sliding_mask)
            else:
                h = layer(h, kv.position, t.rope_full, kv.full_k, kv.full_v, kv.full_mask)
        h = self.norm(h)[0]
        return self.logits_from_hidden(h), self.post_projection(h)

    def draft(
        self,
        target,
        cache: KVCache,
        token: Int[Array, ""],
        hidden: Float[Array, " backbone"],
        steps: int,
        key: PRNGKeyArray | None = None,
        choose=None,
    ) -> tuple[Int[Array, " steps"], Float[Array, "steps vocab"]]:
        """`steps` draft tokens after `token` (the last seen token: not yet in `cache`, predicted by the target
        from `hidden`, its final-norm hidden state). Greedy, or `choose(logits, key) -> token` per step. Returns
        the tokens and the drafter's logits at each step (one sequence)."""
        kv = shared_kv(target, cache, self.config.text.sliding_window)
        scale = jnp.asarray(target.config.text.embed_scale, jnp.float32).astype(target.dtype)
        keys = jax.random.split(jax.random.key(0) if key is None else key, steps)

        def body(carry, k):
            tok, state = carry
            logits, state = self.step(target.embed_tokens[tok] * scale, state, kv)
            nxt = jnp.argmax(logits).astype(jnp.int32) if choose is None else choose(logits, k)
            return (nxt, state), (nxt, logits)

        _, (tokens, logits) = jax.lax.scan(body, (jnp.asarray(token, jnp.int32), hidden.astype(self.dtype)), keys)
        return tokens, logits

    def propose_drafts(self, target, cache, token, hidden, history, steps, *, key, choose):
        return self.draft(target, cache, token, hidden, steps, key=key, choose=choose)


__all__ = ["Assistant", "AssistantConfig", "AssistantLayer", "SharedKV", "shared_kv"]
