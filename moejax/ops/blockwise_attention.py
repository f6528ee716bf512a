"""Blockwise (flash) attention in pure JAX: memory linear in length for forward and backward.

The forward pass is the online-softmax algorithm of FlashAttention (Dao et al. 2022; Rabe & Staats
2021, "Self-attention does not need O(n^2) memory"): for each block of queries a loop over blocks
of keys keeps a running row maximum, row sum and float32 output accumulator, so only a
[block_q, block_k] score tile exists at a time. A `jax.custom_vjp` backward (FlashAttention-2,
Dao 2023) saves only q, k, v, the output and the per-row log-sum-exp, and recomputes each score
tile; no [L, M] tensor is stored in either pass.

Design choices:
- Grouped-query attention without copying K/V: q is viewed as [B, L, G, R, K] (query head
  h = g * R + r uses key/value head g) and every einsum contracts against the G key heads.
- Causal block skipping costs nothing here: the key-block loop of a query block stops at the last
  block that holds a visible key (its bound is computed from q_offset, kv_len, so it also works
  when those are traced), and the backward's query-block loop of a key block starts at the first
  query block that can see it. Decoding over a partly filled cache only reads filled blocks.
- Masked scores contribute probability exactly 0 (`where`, not a large negative bias), and a
  query with no visible key outputs zeros.
- Lengths that do not divide the block size are padded; padded keys are masked, padded queries
  are sliced off (their cotangent is zero).

Einsum letters: b batch, l query position, m key position, g key/value heads, r query heads per
key/value head (H = G * R), k head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moejax.ops import attention_mask

# Masked scores before the row maximum is known; finite, so exp(NEG - NEG) = 1, never NaN.
_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one call (hashable: a custom_vjp non-differentiable argument)."""

  block_q: int
  block_k: int
  num_queries: int  # L before padding
  num_keys: int  # M before padding
  causal: bool
  scale: float


def blockwise_attention(
  q_blhk: jax.Array,
  k_bmgk: jax.Array,
  v_bmgk: jax.Array,
  *,
  q_offset=0,
  kv_len=None,
  causal: bool = True,
  scale: float | None = None,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """Attention of L queries over M keys, computed block by block.

  Args:
    q_blhk: [B, L, H, K] queries (any float dtype; scores and softmax run in float32).
    k_bmgk: [B, M, G, K] keys, H a multiple of G.
    v_bmgk: [B, M, G, K] values.
    q_offset: int or int32 scalar (may be traced): absolute position of query 0.
    kv_len: None, int32 scalar or int32 [B]: keys at positions >= kv_len are not visible.
    causal: query at position p sees keys at positions <= p only.
    scale: score scale, default K ** -0.5.
    block_q: queries per block (clipped to L).
    block_k: keys per block (clipped to M).

  Returns:
    [B, L, H, K] in the dtype of q.
  """
  num_heads, num_kv_heads = attention_mask.check_shapes(q_blhk, k_bmgk, v_bmgk, kv_len)
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block sizes must be positive: {block_q=}, {block_k=}")
  (b, length, _, head_dim), max_len = q_blhk.shape, k_bmgk.shape[1]
  static = _Static(
    block_q=min(block_q, length),
    block_k=min(block_k, max_len),
    num_queries=length,
    num_keys=max_len,
    causal=causal,
    scale=head_dim**-0.5 if scale is None else float(scale),
  )
  q_blgrk = q_blhk.reshape(b, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  q_blgrk = _pad_axis1(q_blgrk, static.block_q)
  k_bmgk, v_bmgk = _pad_axis1(k_bmgk, static.block_k), _pad_axis1(v_bmgk, static.block_k)
  q_offset = jnp.asarray(q_offset, jnp.int32)
  kv_len = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
  out = _flash(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static)
  return out[:, :length].reshape(q_blhk.shape)


def _pad_axis1(x, block: int):
  pad = -x.shape[1] % block
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _block(x, index, size: int):
  return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _tile_mask(static: _Static, q_offset, kv_len, i, j):
  """bool [B or 1, 1, 1, block_q, block_k] for query block i against key block j."""
  q_pos = q_offset + i * static.block_q + jnp.arange(static.block_q, dtype=jnp.int32)
  k_pos = j * static.block_k + jnp.arange(static.block_k, dtype=jnp.int32)
  mask = attention_mask.visible_mask(
    q_pos, k_pos, num_keys=static.num_keys, kv_len=kv_len, causal=static.causal
  )
  return mask[:, None, None]


def _key_limit(static: _Static, kv_len):
  """int32: no key at a position >= this is visible to any query (the end of useful keys)."""
  limit = jnp.int32(static.num_keys)
  if kv_len is not None:
    limit = jnp.minimum(limit, jnp.max(kv_len))
  return limit


def _scores(static: _Static, q_blgrk, k_bmgk):
  """float32 [B, G, R, block_q, block_k] scaled scores of one tile."""
  s = jnp.einsum("blgrk,bmgk->bgrlm", q_blgrk, k_bmgk, preferred_element_type=jnp.float32)
  return s * static.scale


def _forward(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static: _Static):
  """Returns (out [B, Lp, G, R, K] in q's dtype, lse float32 [B, G, R, Lp])."""
  b, padded_len, g, r, head_dim = q_blgrk.shape
  bq, bk = static.block_q, static.block_k
  num_k_blocks = k_bmgk.shape[1] // bk
  key_limit = _key_limit(static, kv_len)

  def query_block(i):
    q_i = _block(q_blgrk, i, bq)
    end = key_limit
    if static.causal:
      end = jnp.minimum(end, q_offset + (i + 1) * bq)
    k_blocks = jnp.clip(-(-end // bk), 0, num_k_blocks)

    def key_block(j, carry):
      row_max, row_sum, acc = carry
      mask = _tile_mask(static, q_offset, kv_len, i, j)
      s = jnp.where(mask, _scores(static, q_i, _block(k_bmgk, j, bk)), _NEG)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - new_max[..., None]), 0.0)
      correction = jnp.exp(row_max - new_max)
      row_sum = row_sum * correction + jnp.sum(p, axis=-1)
      v_j = _block(v_bmgk, j, bk)
      pv = jnp.einsum(
        "bgrlm,bmgk->bgrlk", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
      )
      return new_max, row_sum, acc * correction[..., None] + pv

    init = (
      jnp.full((b, g, r, bq), _NEG, jnp.float32),
      jnp.zeros((b, g, r, bq), jnp.float32),
      jnp.zeros((b, g, r, bq, head_dim), jnp.float32),
    )
    row_max, row_sum, acc = jax.lax.fori_loop(0, k_blocks, key_block, init)
    seen = row_sum > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)
    return jnp.einsum("bgrlk->blgrk", out).astype(q_blgrk.dtype), lse

  out_nblgrk, lse_ngrbl = jax.lax.map(query_block, jnp.arange(padded_len // bq))
  out = jnp.moveaxis(out_nblgrk, 0, 1).reshape(q_blgrk.shape)
  lse = jnp.moveaxis(lse_ngrbl, 0, 3).reshape(b, g, r, padded_len)
  return out, lse


def _backward(static: _Static, residuals, dout_blgrk):
  q_blgrk, k_bmgk, v_bmgk, out_blgrk, lse_bgrl, q_offset, kv_len = residuals
  bq, bk = static.block_q, static.block_k
  num_q_blocks = q_blgrk.shape[1] // bq
  key_limit = _key_limit(static, kv_len)
  # delta = rowsum(dO * O): the softmax-backward term shared by every key of a row.
  delta_bgrl = jnp.einsum(
    "blgrk,blgrk->bgrl", dout_blgrk.astype(jnp.float32), out_blgrk.astype(jnp.float32)
  )

  def key_block(dq_acc, j):
    k_j, v_j = _block(k_bmgk, j, bk), _block(v_bmgk, j, bk)
    first = jnp.int32(0)
    if static.causal:
      first = jnp.maximum(0, (j * bk - q_offset) // bq)
    # A key block past every visible key gets no gradient: run zero query blocks.
    first = jnp.where(j * bk >= key_limit, num_q_blocks, first)

    def query_block(i, carry):
      dq_acc, dk, dv = carry
      q_i, do_i = _block(q_blgrk, i, bq), _block(dout_blgrk, i, bq)
      lse_i = jax.lax.dynamic_slice_in_dim(lse_bgrl, i * bq, bq, axis=3)
      delta_i = jax.lax.dynamic_slice_in_dim(delta_bgrl, i * bq, bq, axis=3)
      mask = _tile_mask(static, q_offset, kv_len, i, j)
      p = jnp.where(mask, jnp.exp(_scores(static, q_i, k_j) - lse_i[..., None]), 0.0)
      dv = dv + jnp.einsum(
        "bgrlm,blgrk->bmgk", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
      )
      dp = jnp.einsum("blgrk,bmgk->bgrlm", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None]) * static.scale
      dq_i = jnp.einsum("bgrlm,bmgk->blgrk", ds, k_j, preferred_element_type=jnp.float32)
      dq_acc = jax.lax.dynamic_update_slice_in_dim(
        dq_acc, _block(dq_acc, i, bq) + dq_i, i * bq, axis=1
      )
      dk = dk + jnp.einsum("bgrlm,blgrk->bmgk", ds, q_i, preferred_element_type=jnp.float32)
      return dq_acc, dk, dv

    zeros_kv = jnp.zeros(k_j.shape, jnp.float32)
    dq_acc, dk, dv = jax.lax.fori_loop(
      first, num_q_blocks, query_block, (dq_acc, zeros_kv, zeros_kv)
    )
    return dq_acc, (dk, dv)

  num_k_blocks = k_bmgk.shape[1] // bk
  dq, (dk_nbmgk, dv_nbmgk) = jax.lax.scan(
    key_block, jnp.zeros(q_blgrk.shape, jnp.float32), jnp.arange(num_k_blocks)
  )
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k_bmgk.shape)
  return (
    dq.astype(q_blgrk.dtype),
    unblock(dk_nbmgk).astype(k_bmgk.dtype),
    unblock(dv_nbmgk).astype(v_bmgk.dtype),
    None,
    None,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static: _Static):
  return _forward(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static)[0]


def _flash_fwd(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static: _Static):
  out, lse = _forward(q_blgrk, k_bmgk, v_bmgk, q_offset, kv_len, static)
  return out, (q_blgrk, k_bmgk, v_bmgk, out, lse, q_offset, kv_len)


_flash.defvjp(_flash_fwd, _backward)
