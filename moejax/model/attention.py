"""Causal self-attention with rotary position embeddings, grouped-query heads and optional QK-norm.

Queries have H heads, keys and values G heads (G divides H; query head h reads key/value head
h // (H / G), grouped-query attention; G = H is plain multi-head attention). With `qk_norm` q and
k are RMS-normalised before RoPE: over each head's dimension (`qk_norm_scope` "head", Qwen3), or
over all heads' dimensions at once ("all_heads", OLMoE: scales [H, K] and [G, K]). `qkv_bias`
adds learned biases to q, k and v (Qwen2). The kernel is
`moejax.ops.attention.attention` (`impl`: "auto" picks by platform: splash on TPU, cuDNN / XLA on
GPU, blockwise online softmax on CPU for long sequences, the plain reference otherwise); every
kernel computes the same function, scores in float32.

Einsum letters: b batch, l query position, m key position, d d_model, h query heads, g key/value
heads, k head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import sharding
from moejax.model.layers import RMSNorm, apply_rope, param
from moejax.ops import attention as attention_ops
from moejax.ops import remat

_HEADS = ("batch", "length", "act_heads", None)


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
    num_kv_heads: int | None = None,
    qk_norm: bool = False,
    qk_norm_scope: str = "head",
    qkv_bias: bool = False,
    norm_eps: float = 1e-6,
    impl: str = "auto",
    param_dtype=jnp.float32,
  ):
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"{num_kv_heads=} must divide {num_heads=}")
    self.rules = rules
    self.impl = impl
    make = lambda shape, axes, std: param(rngs, shape, axes, std, param_dtype)
    self.wq = make((d_model, num_heads, head_dim), ("embed", "heads", "kv"), init_std)
    self.wk = make((d_model, num_kv_heads, head_dim), ("embed", "heads", "kv"), init_std)
    self.wv = make((d_model, num_kv_heads, head_dim), ("embed", "heads", "kv"), init_std)
    self.wo = make((num_heads, head_dim, d_model), ("heads", "kv", "embed"), out_std)
    zeros = lambda heads: nnx.Param(jnp.zeros((heads, head_dim), param_dtype), axes=("heads", "kv"))
    self.bq = zeros(num_heads) if qkv_bias else None
    self.bk = zeros(num_kv_heads) if qkv_bias else None
    self.bv = zeros(num_kv_heads) if qkv_bias else None
    if qk_norm_scope == "all_heads":
      norm = lambda heads: RMSNorm(
        (heads, head_dim), eps=norm_eps, axes=("heads", "kv"), dtype=param_dtype
      )
    else:
      norm = lambda heads: RMSNorm(head_dim, eps=norm_eps, axes=("kv",), dtype=param_dtype)
    self.q_norm = norm(num_heads) if qk_norm else None
    self.k_norm = norm(num_kv_heads) if qk_norm else None
    self.rope_theta = rope_theta

  @property
  def num_kv_heads(self) -> int:
    return self.wk.shape[1]

  def cache_shape(self) -> tuple[int, ...]:
    """(*stacked layer axes, key/value heads G, head dim) of this layer's key/value cache."""
    *stacked, _, kv_heads, head_dim = self.wk.shape
    return (*stacked, kv_heads, head_dim)

  def __call__(self, x_bld):
    """[batch, length, d_model] -> [batch, length, d_model], causal."""
    q, k, v = self._qkv(x_bld, offset=0)
    return self._attend(q, k, v, offset=0)

  def decode(self, x_bld, cache: dict, offset):
    """Attention of L new tokens at positions offset..offset+L-1 over a key/value cache.

    Args:
      x_bld: [batch, L, d_model] the new tokens.
      cache: {"k", "v": [batch, M, G, head_dim]} (G key/value heads), positions < offset filled
        (M >= offset + L).
      offset: int32 scalar (may be traced), the number of positions already cached.

    Returns:
      ([batch, L, d_model], the cache with positions offset..offset+L-1 written).
    """
    return decode_with_cache(self, x_bld, cache, offset)

  def _qkv(self, x_bld, offset):
    """q [B, L, H, K], k and v [B, L, G, K] in the compute dtype, RoPE applied to q and k."""
    dtype = x_bld.dtype

    def proj(w, bias, name):
      y = jnp.einsum("bld,dhk->blhk", x_bld, w[...].astype(dtype))
      y = y if bias is None else y + bias[...].astype(dtype)
      return checkpoint_name(sharding.constrain(y, _HEADS, self.rules), name)

    q, k = proj(self.wq, self.bq, remat.QUERY_PROJ), proj(self.wk, self.bk, remat.KEY_PROJ)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, self.rope_theta, offset)
    k = apply_rope(k, self.rope_theta, offset)
    return q, k, proj(self.wv, self.bv, remat.VALUE_PROJ)

  def _attend(self, q_blhk, k_bmgk, v_bmgk, *, offset):
    dtype = q_blhk.dtype
    kernel = functools.partial(
      attention_ops.attention, impl=self.impl, q_offset=offset, causal=True
    )
    resolved = attention_ops.resolve_impl(self.impl, length=q_blhk.shape[1], q_offset=offset)
    if resolved == "tpu_splash" and self.rules is not None:
      kernel = per_shard(kernel, self.rules)  # the Pallas kernel sees one device's block
    out = kernel(q_blhk, k_bmgk, v_bmgk.astype(dtype))
    out = checkpoint_name(sharding.constrain(out, _HEADS, self.rules), remat.CONTEXT)
    out = jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(dtype))
    return checkpoint_name(out, remat.OUT_PROJ)


def per_shard(kernel, rules: sharding.Rules):
  """`kernel(q, k, v)` run on each device's rows and heads (`jax.shard_map` over the context
  mesh): for kernels that cannot be partitioned by GSPMD (Pallas). Query heads and key/value
  heads split over the same devices in contiguous blocks, so each device's query heads read its
  own key/value heads (validate requires num_kv_heads to divide over them)."""
  spec = rules.spec(_HEADS)
  return jax.shard_map(
    kernel,
    mesh=sharding.context_mesh(),
    in_specs=(spec, spec, spec),
    out_specs=spec,
    check_vma=False,
  )


def decode_with_cache(module, x_bld, cache: dict, offset):
  """`module.decode` of an attention with `_qkv(x, offset)` and `_attend(q, k, v, offset=)`:
  writes the new keys and values at offset.. into the cache, then attends over it."""
  q, k, v = module._qkv(x_bld, offset)
  start = (0, offset, 0, 0)
  k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
  v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
  # Query offset + l sees keys <= offset + l: unwritten cache slots get probability exactly 0.
  return module._attend(q, k, v, offset=offset), {"k": k, "v": v}
