"""Multi-head latent attention (MLA, DeepSeek-V2 / V3): keys and values from a low-rank latent.

Per token x [D] (einsum letters: b batch, l position, d d_model, h heads, r a latent rank,
k a per-head width):
  q = RMSNorm(x Wq_a) Wq_b, or x Wq when q_lora_rank is 0        [H, Kn + Kr]
  c, k_r = split(x Wkv_a)                                         c [R], k_r [Kr]
  k_n, v = split(RMSNorm(c) Wkv_b)                                [H, Kn], [H, Kv]
  q = [q_n, rope(q_r)], k = [k_n, rope(k_r)] (one rotary key shared by every head)
  out = softmax(q k / sqrt(Kn + Kr)) v Wo                          Wo [H, Kv, D]
RoPE pairs the two halves of the Kr rotary dimensions (as `layers.apply_rope`); a checkpoint that
pairs interleaved dimensions is converted by permuting its weights (moejax/hf).

Design choices:
- The keys and values are expanded to H heads and attended by `moejax.ops.attention` (any
  kernel). Query/key and value widths differ, so the narrower side is zero-padded to the wider
  (zeros add nothing to a dot product; padded output columns are dropped), with the score scale
  passed explicitly.
- The KV cache holds the expanded, padded keys and values [B, M, H, max(Kn + Kr, Kv)], not the
  latent c: the same cache code as `Attention`, at more memory than DeepSeek's latent cache.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from moejax import errors, sharding
from moejax.model import attention
from moejax.model.layers import RMSNorm, apply_rope, param
from moejax.ops import attention as attention_ops

_HEADS = ("batch", "length", "act_heads", None)


@dataclasses.dataclass(frozen=True)
class MLAOptions:
  """`model.mla.*` (used when model.attention='mla').

  Attributes:
    q_lora_rank: rank of the query's low-rank factorisation; 0 = a full-rank query projection.
    kv_lora_rank: R, the width of the latent c.
    qk_nope_head_dim: Kn, per-head query/key width without position.
    qk_rope_head_dim: Kr, per-head rotary width (even), one rotary key for all heads.
    v_head_dim: Kv, per-head value width.
    latent_norm_eps: epsilon of the RMSNorms of the latents.
  """

  q_lora_rank: int = 0
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  latent_norm_eps: float = 1e-6

  def __post_init__(self):
    for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      if getattr(self, field) <= 0:
        raise errors.ConfigError(f"model.mla.{field}={getattr(self, field)}: must be positive")
    if self.q_lora_rank < 0 or self.qk_rope_head_dim % 2:
      raise errors.ConfigError(
        f"model.mla: q_lora_rank={self.q_lora_rank} must be >= 0 (0 = full rank) and "
        f"qk_rope_head_dim={self.qk_rope_head_dim} even (rotary pairs)"
      )


class LatentAttention(nnx.Module):
  """Causal MLA with the interface of `Attention` (`__call__`, `decode`, `cache_shape`)."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    options: MLAOptions,
    *,
    rope_theta: float,
    init_std: float,
    out_std: float,
    rngs: nnx.Rngs,
    rules: sharding.Rules | None = None,
    impl: str = "auto",
    param_dtype=jnp.float32,
  ):
    o, h = options, num_heads
    self.options, self.rope_theta, self.impl, self.rules = o, rope_theta, impl, rules
    make = lambda shape, axes, std=init_std: param(rngs, shape, axes, std, param_dtype)
    norm = lambda rank: RMSNorm(rank, eps=o.latent_norm_eps, axes=(None,), dtype=param_dtype)
    qk = o.qk_nope_head_dim + o.qk_rope_head_dim
    if o.q_lora_rank:
      self.wq, self.wq_a = None, make((d_model, o.q_lora_rank), ("embed", None))
      self.q_norm = norm(o.q_lora_rank)
      self.wq_b = make((o.q_lora_rank, h, qk), (None, "heads", "kv"))
    else:
      self.wq, self.wq_a, self.q_norm, self.wq_b = (
        make((d_model, h, qk), ("embed", "heads", "kv")),
        None,
        None,
        None,
      )
    self.wkv_a = make((d_model, o.kv_lora_rank + o.qk_rope_head_dim), ("embed", None))
    self.kv_norm = norm(o.kv_lora_rank)
    self.wkv_b = make((o.kv_lora_rank, h, o.qk_nope_head_dim + o.v_head_dim), (None, "heads", "kv"))
    self.wo = make((h, o.v_head_dim, d_model), ("heads", "kv", "embed"), out_std)

  def cache_shape(self) -> tuple[int, ...]:
    """(*stacked layer axes, cached heads, cached width) of this layer's key/value cache."""
    *stacked, _, heads, _ = self.wkv_b.shape
    o = self.options
    return (*stacked, heads, max(o.qk_nope_head_dim + o.qk_rope_head_dim, o.v_head_dim))

  def __call__(self, x_bld):
    """[batch, length, d_model] -> [batch, length, d_model], causal."""
    q, k, v = self._qkv(x_bld, offset=0)
    return self._attend(q, k, v, offset=0)

  def decode(self, x_bld, cache: dict, offset):
    """As `Attention.decode`; the cache holds the padded per-head keys and values."""
    return attention.decode_with_cache(self, x_bld, cache, offset)

  def _qkv(self, x_bld, offset):
    """q, k, v [B, L, H, max(Kn + Kr, Kv)] (zero-padded), RoPE applied."""
    o, dtype = self.options, x_bld.dtype
    w = lambda p: p[...].astype(dtype)
    if self.wq is not None:
      q = jnp.einsum("bld,dhk->blhk", x_bld, w(self.wq))
    else:
      q_lat = self.q_norm(jnp.einsum("bld,dr->blr", x_bld, w(self.wq_a)))
      q = jnp.einsum("blr,rhk->blhk", q_lat, w(self.wq_b))
    kv_lat = jnp.einsum("bld,dr->blr", x_bld, w(self.wkv_a))
    latent, k_rot = kv_lat[..., : o.kv_lora_rank], kv_lat[..., o.kv_lora_rank :]
    kv = jnp.einsum("blr,rhk->blhk", self.kv_norm(latent), w(self.wkv_b))
    k_nope, v = kv[..., : o.qk_nope_head_dim], kv[..., o.qk_nope_head_dim :]
    q_nope, q_rot = q[..., : o.qk_nope_head_dim], q[..., o.qk_nope_head_dim :]
    q_rot = apply_rope(q_rot, self.rope_theta, offset)
    k_rot = apply_rope(k_rot[:, :, None, :], self.rope_theta, offset)
    k_rot = jnp.broadcast_to(k_rot, (*k_nope.shape[:3], o.qk_rope_head_dim))
    q = jnp.concatenate([q_nope, q_rot], axis=-1)
    k = jnp.concatenate([k_nope, k_rot], axis=-1)
    width = max(q.shape[-1], v.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    return tuple(sharding.constrain(pad(x), _HEADS, self.rules) for x in (q, k, v))

  def _attend(self, q_blhk, k_bmhk, v_bmhk, *, offset):
    o = self.options
    scale = (o.qk_nope_head_dim + o.qk_rope_head_dim) ** -0.5
    out = attention_ops.attention(
      q_blhk, k_bmhk, v_bmhk.astype(q_blhk.dtype), impl=self.impl, q_offset=offset, scale=scale
    )
    out = sharding.constrain(out, _HEADS, self.rules)[..., : o.v_head_dim]
    return jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(q_blhk.dtype))
