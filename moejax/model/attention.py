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
  def __init__(
    self,
    d_model: int,
    num_heads: int,
    head_dim: int,
    *,
    rope_theta: float,
    init_std: float,
    out_std: float,
    rngs: nnx.Rngs,
    rules: sharding.Rules | None = None,
  ):
    self.rules = rules
    shape, axes = (d_model, num_heads, head_dim), ("embed", "heads", "kv")
    self.wq = param(rngs, shape, axes, init_std)
    self.wk = param(rngs, shape, axes, init_std)
    self.wv = param(rngs, shape, axes, init_std)
    self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "kv", "embed"), out_std)
    self.rope_theta = rope_theta

  def __call__(self, x_bld):
    """[batch, length, d_model] -> [batch, length, d_model], causal."""
    q, k, v = self._qkv(x_bld, offset=0)
    length = x_bld.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return self._attend(q, k, v, causal)

  def decode(self, x_bld, cache: dict, offset):
    """Attention of L new tokens at positions offset..offset+L-1 over a key/value cache.

    Args:
      x_bld: [batch, L, d_model] the new tokens.
      cache: {"k", "v": [batch, M, heads, head_dim]}, positions < offset filled (M >= offset+L).
      offset: int32 scalar (may be traced), the number of positions already cached.

    Returns:
      ([batch, L, d_model], the cache with positions offset..offset+L-1 written).
    """
    q, k, v = self._qkv(x_bld, offset)
    start = (0, offset, 0, 0)
    k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
    v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
    length, max_len = x_bld.shape[1], k.shape[1]
    # Query offset + l sees keys <= offset + l; unwritten cache slots get probability exactly 0.
    visible = jnp.arange(max_len)[None, :] <= offset + jnp.arange(length)[:, None]
    return self._attend(q, k, v, visible), {"k": k, "v": v}

  def _qkv(self, x_bld, offset):
    dtype = x_bld.dtype
    proj = lambda w: sharding.constrain(
      jnp.einsum("bld,dhk->blhk", x_bld, w[...].astype(dtype)),
      ("batch", "length", "act_heads", None),
      self.rules,
    )
    q = apply_rope(proj(self.wq), self.rope_theta, offset)
    k = apply_rope(proj(self.wk), self.rope_theta, offset)
    return q, k, proj(self.wv)

  def _attend(self, q_blhk, k_bmhk, v_bmhk, visible_lm):
    dtype = q_blhk.dtype
    scale = q_blhk.shape[-1] ** -0.5
    scores = jnp.einsum("blhk,bmhk->bhlm", q_blhk, k_bmhk, preferred_element_type=jnp.float32)
    scores = jnp.where(visible_lm[None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhlm,bmhk->blhk", probs, v_bmhk.astype(dtype))
    return jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(dtype))
