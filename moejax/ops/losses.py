"""Token cross-entropy of the unembedding without materialising [T, V] logits.

`chunked_nll_sum` walks over chunks of about `chunk` tokens with `jax.lax.scan`; each step builds
only float32 [chunk, V] logits. A [B, L, D] input is chunked along L (a chunk = the same
max(1, chunk // B) positions of every row), so when the batch axis is sharded over devices each
device keeps its rows and the scan axis is never split across devices. Its `jax.custom_vjp`
forward also computes the gradients chunk by chunk (the loss is a scalar, so d loss / d logits =
softmax - onehot is known as soon as a chunk's logits are), keeping d hidden [T, D] and a float32
d unembed [D, V] as residuals; the backward only scales them by the incoming cotangent. That is
3 matmuls per chunk in training (logits, d hidden, d unembed) against 4 for recomputation with
`jax.checkpoint`, and no [T, V] tensor in either pass. Without differentiation (evaluation) only
the logits and the loss are computed.

Optional z-loss (PaLM, Chowdhery et al. 2022): z_loss_weight * logsumexp(logits)^2 per token,
keeping the softmax normaliser near 1.

Einsum letters: t token (batch and length flattened), b row, d d_model, v vocabulary, c position
in a chunk, n chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class _Static:
  chunk: int
  z_loss_weight: float


def full_nll_sum(hidden_td, unembed_dv, targets_t, *, mask=None, z_loss_weight: float = 0.0):
  """Reference: (summed token NLL, token count) from the full float32 [T, V] logits.

  Arguments as `chunked_nll_sum`.
  """
  hidden_td, targets_t, weights_t = _flatten(hidden_td, targets_t, mask)
  logits_tv = _logits(hidden_td, unembed_dv)
  lse_t = jax.nn.logsumexp(logits_tv, axis=-1)
  target_logit_t = jnp.take_along_axis(logits_tv, targets_t[:, None], axis=-1)[:, 0]
  per_token = lse_t - target_logit_t + z_loss_weight * jnp.square(lse_t)
  return jnp.sum(weights_t * per_token), jnp.sum(weights_t)


def full_cross_entropy(hidden_td, unembed_dv, targets_t, *, mask=None, z_loss_weight=0.0):
  """Reference mean token NLL (plus z-loss) from the full logits; 0 when no token counts."""
  total, count = full_nll_sum(
    hidden_td, unembed_dv, targets_t, mask=mask, z_loss_weight=z_loss_weight
  )
  return total / jnp.maximum(count, 1.0)


def chunked_nll_sum(
  hidden_td, unembed_dv, targets_t, *, chunk: int, mask=None, z_loss_weight: float = 0.0
):
  """(summed token NLL, token count), float32, computed over chunks of tokens.

  Args:
    hidden_td: [T, D] or [B, L, D] final hidden states (any float dtype; the matmul runs in this
      dtype with float32 accumulation, like the model's unembedding).
    unembed_dv: [D, V] unembedding matrix (cast to hidden's dtype for the matmul).
    targets_t: int [T] or [B, L] target token ids.
    chunk: tokens per chunk; [B, L, D] is chunked along L, max(1, chunk // B) positions at a
      time; the length need not be a multiple (the tail chunk is padded and masked).
    mask: None (every token counts) or bool / 0-1 float of targets' shape; a float mask is a
      per-token weight.
    z_loss_weight: weight of the z-loss term logsumexp(logits)^2 added to each token's NLL.

  Returns:
    (sum over tokens of weight * (NLL + z-loss), sum of weights): what evaluation accumulates
    across batches; `chunked_cross_entropy` is their ratio.
  """
  if chunk <= 0:
    raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
  _flatten(hidden_td, targets_t, mask)  # checks the shapes
  hidden_bld = hidden_td if hidden_td.ndim == 3 else hidden_td.reshape(1, -1, hidden_td.shape[-1])
  targets_bl = targets_t.reshape(hidden_bld.shape[:2]).astype(jnp.int32)
  weights = jnp.ones(targets_t.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  weights_bl = weights.reshape(hidden_bld.shape[:2])
  b, length = hidden_bld.shape[:2]
  positions = min(max(1, chunk // b), length)
  static = _Static(chunk=positions, z_loss_weight=float(z_loss_weight))
  total = _chunked_sum(hidden_bld, unembed_dv, targets_bl, weights_bl, static)
  return total, jnp.sum(weights_bl)


def chunked_cross_entropy(
  hidden_td, unembed_dv, targets_t, *, chunk: int, mask=None, z_loss_weight: float = 0.0
):
  """Mean token NLL (plus z-loss) over the counted tokens; arguments as `chunked_nll_sum`."""
  total, count = chunked_nll_sum(
    hidden_td, unembed_dv, targets_t, chunk=chunk, mask=mask, z_loss_weight=z_loss_weight
  )
  return total / jnp.maximum(count, 1.0)


def _flatten(hidden, targets, mask):
  """[..., D], [...], mask -> [T, D], int32 [T], float32 weights [T]."""
  if hidden.shape[:-1] != targets.shape:
    raise ValueError(f"hidden {hidden.shape} must be targets {targets.shape} + [d_model]")
  if mask is not None and jnp.shape(mask) != targets.shape:
    raise ValueError(f"mask shape {jnp.shape(mask)} must equal targets shape {targets.shape}")
  weights = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return (
    hidden.reshape(-1, hidden.shape[-1]),
    targets.reshape(-1).astype(jnp.int32),
    weights.reshape(-1),
  )


def _logits(hidden_cd, unembed_dv):
  """[..., D] x [D, V] -> float32 [..., V]."""
  return jnp.einsum(
    "...d,dv->...v",
    hidden_cd,
    unembed_dv.astype(hidden_cd.dtype),
    preferred_element_type=jnp.float32,
  )


def _chunked(static: _Static, hidden_bld, targets_bl, weights_bl):
  """Pads L to a multiple of the chunk's C positions (weight 0) and splits along L:
  [N, B, C, D], [N, B, C], [N, B, C] (chunk n = positions n*C .. (n+1)*C - 1 of every row)."""
  b, length = targets_bl.shape
  pad = -length % static.chunk
  n = (length + pad) // static.chunk

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, static.chunk, *x.shape[2:]), 1, 0)

  return split(hidden_bld), split(targets_bl), split(weights_bl)


def _chunk_loss(static: _Static, hidden_bcd, unembed_dv, targets_bc, weights_bc):
  """Returns (weighted loss sum of the chunk, float32 logits [B, C, V], logsumexp [B, C])."""
  logits_bcv = _logits(hidden_bcd, unembed_dv)
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  per_token = lse_bc - target_logit_bc + static.z_loss_weight * jnp.square(lse_bc)
  return jnp.sum(weights_bc * per_token), logits_bcv, lse_bc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sum(hidden_bld, unembed_dv, targets_bl, weights_bl, static: _Static):
  def step(total, xs):
    h_bcd, t_bc, w_bc = xs
    return total + _chunk_loss(static, h_bcd, unembed_dv, t_bc, w_bc)[0], None

  xs = _chunked(static, hidden_bld, targets_bl, weights_bl)
  return jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)[0]


def _chunked_sum_fwd(hidden_bld, unembed_dv, targets_bl, weights_bl, static: _Static):
  compute = hidden_bld.dtype

  def step(carry, xs):
    total, d_unembed_dv = carry
    h_bcd, t_bc, w_bc = xs
    loss, logits_bcv, lse_bc = _chunk_loss(static, h_bcd, unembed_dv, t_bc, w_bc)
    probs_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
    # d/dlogits of NLL is softmax - onehot; of z * lse^2 it is 2 z lse softmax.
    z_factor_bc = 1.0 + 2.0 * static.z_loss_weight * lse_bc
    onehot_bcv = jax.nn.one_hot(t_bc, logits_bcv.shape[-1], dtype=jnp.float32)
    d_logits_bcv = w_bc[..., None] * (probs_bcv * z_factor_bc[..., None] - onehot_bcv)
    d_logits_bcv = d_logits_bcv.astype(compute)
    d_hidden_bcd = jnp.einsum(
      "bcv,dv->bcd", d_logits_bcv, unembed_dv.astype(compute), preferred_element_type=jnp.float32
    )
    d_unembed_dv = d_unembed_dv + jnp.einsum(
      "bcd,bcv->dv", h_bcd, d_logits_bcv, preferred_element_type=jnp.float32
    )
    return (total + loss, d_unembed_dv), d_hidden_bcd.astype(compute)

  xs = _chunked(static, hidden_bld, targets_bl, weights_bl)
  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_dv.shape, jnp.float32))
  (total, d_unembed_dv), d_hidden_nbcd = jax.lax.scan(step, init, xs)
  b, length, d = hidden_bld.shape
  d_hidden_bld = jnp.moveaxis(d_hidden_nbcd, 0, 1).reshape(b, -1, d)[:, :length]
  return total, (d_hidden_bld, d_unembed_dv.astype(unembed_dv.dtype))


def _chunked_sum_bwd(static: _Static, residuals, g):
  del static
  d_hidden_td, d_unembed_dv = residuals
  g = g.astype(jnp.float32)
  d_hidden = (d_hidden_td.astype(jnp.float32) * g).astype(d_hidden_td.dtype)
  d_unembed = (d_unembed_dv.astype(jnp.float32) * g).astype(d_unembed_dv.dtype)
  return d_hidden, d_unembed, None, None


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd)
