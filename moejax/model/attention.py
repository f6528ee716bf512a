"""Causal multi-head self-attention with rotary position embeddings.

Einsum letters: b batch, l query position, m key position, d d_model, h heads, k head dim.
Scores and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.layers import apply_rope, param


class Attention(nnx.Module):
  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float,
               init_std: float, out_std: float, rngs: nnx.Rngs):  # fmt: skip
    shape, axes = (d_model, num_heads, head_dim), ("embed", "heads", "kv")
    self.wq = param(rngs, shape, axes, init_std)
    self.wk = param(rngs, shape, axes, init_std)
    self.wv = param(rngs, shape, axes, init_std)
    self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "kv", "embed"), out_std)
    self.rope_theta = rope_theta

  def __call__(self, x_bld):
    """[batch, length, d_model] -> [batch, length, d_model], causal."""
    dtype = x_bld.dtype
    proj = lambda w: sharding.constrain(
      jnp.einsum("bld,dhk->blhk", x_bld, w[...].astype(dtype)),
      ("batch", "length", "act_heads", None),
    )
    q = apply_rope(proj(self.wq), self.rope_theta)
    k = apply_rope(proj(self.wk), self.rope_theta)
    v = proj(self.wv)
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("blhk,bmhk->bhlm", q, k, preferred_element_type=jnp.float32) * scale
    length = x_bld.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhlm,bmhk->blhk", probs, v)
    return jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(dtype))
