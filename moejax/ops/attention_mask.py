"""Which keys a query may attend to, and the shape checks shared by every attention kernel.

Positions: query l of a call sits at absolute position `q_offset + l` (q_offset = 0 for training
and prefill, the number of already cached tokens when decoding); key m sits at position m of the
key/value array (the cache when decoding). Query l sees key m iff
  m < num_keys                      (keys past the real length are padding),
  m < kv_len[b]  (when given)       (unwritten cache slots, ragged batches),
  m <= q_offset + l  (when causal).

Einsum letters: b batch, l query position, m key position, h query heads, g key/value heads,
k head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_mask(q_pos_l, k_pos_m, *, num_keys: int, kv_len=None, causal: bool = True):
  """bool [B or 1, L, M]: query at absolute position q_pos_l[l] may attend to key k_pos_m[m].

  Args:
    q_pos_l: int32 [L] absolute query positions (q_offset + l).
    k_pos_m: int32 [M] key positions.
    num_keys: keys at positions >= num_keys are padding, never visible.
    kv_len: None, an int32 scalar or int32 [B]: keys at positions >= kv_len[b] are not visible.
    causal: keys after the query's position are not visible.
  """
  k_pos = k_pos_m[None, None, :]
  ok = jnp.broadcast_to(k_pos < num_keys, (1, q_pos_l.shape[0], k_pos_m.shape[0]))
  if causal:
    ok = ok & (k_pos <= q_pos_l[None, :, None])
  if kv_len is not None:
    ok = ok & (k_pos < jnp.reshape(jnp.asarray(kv_len, jnp.int32), (-1, 1, 1)))
  return ok


def check_shapes(q_blhk, k_bmgk, v_bmgk, kv_len=None) -> tuple[int, int]:
  """Raises a one-line ValueError for inconsistent shapes; returns (H, G) head counts."""
  if q_blhk.ndim != 4 or k_bmgk.ndim != 4:
    raise ValueError(
      f"attention wants q [B, L, H, K] and k, v [B, M, G, K]; got q {q_blhk.shape}, "
      f"k {k_bmgk.shape}"
    )
  if k_bmgk.shape != v_bmgk.shape:
    raise ValueError(f"k {k_bmgk.shape} and v {v_bmgk.shape} must have the same shape")
  (b, _, h, hd), (bk, _, g, kd) = q_blhk.shape, k_bmgk.shape
  if b != bk or hd != kd:
    raise ValueError(f"q {q_blhk.shape} and k {k_bmgk.shape} differ in batch or head dim")
  if h % g:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {g} (GQA)")
  if kv_len is not None and jnp.ndim(kv_len) not in (0, 1):
    raise ValueError(f"kv_len must be a scalar or [B]; got shape {jnp.shape(kv_len)}")
  if kv_len is not None and jnp.ndim(kv_len) == 1 and jnp.shape(kv_len)[0] != b:
    raise ValueError(f"kv_len has shape {jnp.shape(kv_len)}, want [B] = [{b}]")
  return h, g


def is_static_int(x) -> bool:
  """True for a Python/numpy integer known at trace time (not a jax array or tracer)."""
  return not isinstance(x, jax.Array) and int(x) == x
