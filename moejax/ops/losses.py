"""Token cross-entropy of the unembedding without materialising [T, V] logits.

`chunked_nll_sum` walks over chunks of `chunk` tokens with `jax.lax.scan`; each step builds only
float32 [chunk, V] logits. Its `jax.custom_vjp` forward also computes the gradients chunk by chunk
(the loss is a scalar, so d loss / d logits = softmax - onehot is known as soon as a chunk's
logits are), keeping d hidden [T, D] and a float32 d unembed [D, V] as residuals; the backward
only scales them by the incoming cotangent. That is 3 matmuls per chunk in training (logits,
d hidden, d unembed) against 4 for recomputation with `jax.checkpoint`, and no [T, V] tensor in
either pass. Without differentiation (evaluation) only the logits and the loss are computed.

Optional z-loss (PaLM, Chowdhery et al. 2022): z_loss_weight * logsumexp(logits)^2 per token,
keeping the softmax normaliser near 1.

Einsum letters: t token (batch and length flattened), d d_model, v vocabulary, c token in a chunk,
n chunk.
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
    chunk: tokens per chunk; T need not be a multiple (the tail chunk is padded and masked).
    mask: None (every token counts) or bool / 0-1 float of targets' shape; a float mask is a
      per-token weight.
    z_loss_weight: weight of the z-loss term logsumexp(logits)^2 added to each token's NLL.

  Returns:
    (sum over tokens of weight * (NLL + z-loss), sum of weights): what evaluation accumulates
    across batches; `chunked_cross_entropy` is their ratio.
  """
  if chunk <= 0:
    raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
  hidden_td, targets_t, weights_t = _flatten(hidden_td, targets_t, mask)
  static = _Static(chunk=min(chunk, hidden_td.shape[0]), z_loss_weight=float(z_loss_weight))
  total = _chunked_sum(hidden_td, unembed_dv, targets_t, weights_t, static)
  return total, jnp.sum(weights_t)


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
  return jnp.einsum(
    "cd,dv->cv", hidden_cd, unembed_dv.astype(hidden_cd.dtype), preferred_element_type=jnp.float32
  )


def _chunked(static: _Static, hidden_td, targets_t, weights_t):
  """Pads T to a multiple of the chunk (weight 0) and splits: [N, C, D], [N, C], [N, C]."""
  pad = -hidden_td.shape[0] % static.chunk
  hidden_td = jnp.pad(hidden_td, [(0, pad), (0, 0)])
  targets_t, weights_t = jnp.pad(targets_t, (0, pad)), jnp.pad(weights_t, (0, pad))
  n = hidden_td.shape[0] // static.chunk
  return (
    hidden_td.reshape(n, static.chunk, -1),
    targets_t.reshape(n, static.chunk),
    weights_t.reshape(n, static.chunk),
  )


def _chunk_loss(static: _Static, hidden_cd, unembed_dv, targets_c, weights_c):
  """Returns (weighted loss sum of the chunk, float32 logits [C, V], logsumexp [C])."""
  logits_cv = _logits(hidden_cd, unembed_dv)
  lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
  target_logit_c = jnp.take_along_axis(logits_cv, targets_c[:, None], axis=-1)[:, 0]
  per_token = lse_c - target_logit_c + static.z_loss_weight * jnp.square(lse_c)
  return jnp.sum(weights_c * per_token), logits_cv, lse_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sum(hidden_td, unembed_dv, targets_t, weights_t, static: _Static):
  def step(total, xs):
    h_cd, t_c, w_c = xs
    return total + _chunk_loss(static, h_cd, unembed_dv, t_c, w_c)[0], None

  xs = _chunked(static, hidden_td, targets_t, weights_t)
  return jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)[0]


def _chunked_sum_fwd(hidden_td, unembed_dv, targets_t, weights_t, static: _Static):
  compute = hidden_td.dtype

  def step(carry, xs):
    total, d_unembed_dv = carry
    h_cd, t_c, w_c = xs
    loss, logits_cv, lse_c = _chunk_loss(static, h_cd, unembed_dv, t_c, w_c)
    probs_cv = jnp.exp(logits_cv - lse_c[:, None])
    # d/dlogits of NLL is softmax - onehot; of z * lse^2 it is 2 z lse softmax.
    z_factor_c = 1.0 + 2.0 * static.z_loss_weight * lse_c
    onehot_cv = jax.nn.one_hot(t_c, logits_cv.shape[-1], dtype=jnp.float32)
    d_logits_cv = (w_c[:, None] * (probs_cv * z_factor_c[:, None] - onehot_cv)).astype(compute)
    d_hidden_cd = jnp.einsum(
      "cv,dv->cd", d_logits_cv, unembed_dv.astype(compute), preferred_element_type=jnp.float32
    )
    d_unembed_dv = d_unembed_dv + jnp.einsum(
      "cd,cv->dv", h_cd, d_logits_cv, preferred_element_type=jnp.float32
    )
    return (total + loss, d_unembed_dv), d_hidden_cd.astype(compute)

  xs = _chunked(static, hidden_td, targets_t, weights_t)
  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_dv.shape, jnp.float32))
  (total, d_unembed_dv), d_hidden_ncd = jax.lax.scan(step, init, xs)
  num_tokens = hidden_td.shape[0]
  d_hidden_td = d_hidden_ncd.reshape(-1, hidden_td.shape[-1])[:num_tokens]
  return total, (d_hidden_td, d_unembed_dv.astype(unembed_dv.dtype))


def _chunked_sum_bwd(static: _Static, residuals, g):
  del static
  d_hidden_td, d_unembed_dv = residuals
  g = g.astype(jnp.float32)
  d_hidden = (d_hidden_td.astype(jnp.float32) * g).astype(d_hidden_td.dtype)
  d_unembed = (d_unembed_dv.astype(jnp.float32) * g).astype(d_unembed_dv.dtype)
  return d_hidden, d_unembed, None, None


_chunked_sum.defvjp(_chunked_sum_fwd, _chunked_sum_bwd)
