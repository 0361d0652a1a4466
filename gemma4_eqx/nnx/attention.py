"""Self-attention of the NNX reference (docs/spec/decoder-and-checkpoint.md §3.4), batched `[batch, seq, ...]` like transformers' eager path.

Sliding layers: GQA with their own `v_proj`. Full layers with `attention_k_eq_v`: one KV head, no `v_proj`;
the values are the raw `k_proj` output, taken before `k_norm` and RoPE. Values are never rotated and go through
the scale-free `v_norm`. Scores use scaling 1.0, an additive mask, and a softmax in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from ..config import TextConfig
from .norms import RMSNorm, compute_dtype
from .rope import apply_rotary_pos_emb


def repeat_kv(x: Float[Array, "batch seq kv_heads head_dim"], n_rep: int) -> Float[Array, "batch seq heads head_dim"]:
    """Each KV head serves `n_rep` consecutive query heads (transformers' `repeat_kv`)."""
    return x if n_rep == 1 else jnp.repeat(x, n_rep, axis=2)


def eager_attention(
    query: Float[Array, "batch seq heads head_dim"],
    key: Float[Array, "batch kv_seq heads head_dim"],
    value: Float[Array, "batch kv_seq heads head_dim"],
    mask: Bool[Array, "batch seq kv_seq"],
) -> Float[Array, "batch seq heads head_dim"]:
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * jnp.asarray(1.0, query.dtype)  # scaling = 1.0
    bias = jnp.where(mask, jnp.asarray(0, scores.dtype), jnp.finfo(scores.dtype).min)
    scores = scores + bias[:, None, :, :]
    probs = jax.nn.softmax(scores.astype(compute_dtype(scores.dtype)), axis=-1).astype(query.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        geometry = cfg.layer_geometry_for_type(layer_type)
        self.layer_type = layer_type
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = geometry.num_key_value_heads
        self.head_dim = geometry.head_dim
        d, hd, eps = cfg.hidden_size, geometry.head_dim, cfg.rms_norm_eps
        init = nnx.initializers.normal(cfg.initializer_range)

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init,
                              rngs=rngs)

        self.q_proj = linear(d, self.num_heads * hd)
        self.k_proj = linear(d, self.num_kv_heads * hd)
        self.v_proj = linear(d, self.num_kv_heads * hd) if geometry.has_v_proj else None
        self.o_proj = linear(self.num_heads * hd, d)
        self.q_norm = RMSNorm(hd, eps=eps, dtype=dtype)
        self.k_norm = RMSNorm(hd, eps=eps, dtype=dtype)
        self.v_norm = RMSNorm(hd, eps=eps, with_scale=False)

    def __call__(
        self,
        hidden_states: Float[Array, "batch seq hidden"],
        cos: Float[Array, "batch seq head_dim"],
        sin: Float[Array, "batch seq head_dim"],
        mask: Bool[Array, "batch seq seq"],
    ) -> Float[Array, "batch seq hidden"]:
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        query = apply_rotary_pos_emb(self.q_norm(self.q_proj(hidden_states).reshape(shape)), cos, sin)
        key = self.k_proj(hidden_states).reshape(shape)
        value = key if self.v_proj is None else self.v_proj(hidden_states).reshape(shape)  # k_eq_v: raw keys
        key = apply_rotary_pos_emb(self.k_norm(key), cos, sin)
        value = self.v_norm(value)
        n_rep = self.num_heads // self.num_kv_heads
        out = eager_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), mask)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
