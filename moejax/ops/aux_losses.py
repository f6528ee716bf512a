"""Auxiliary router losses and router statistics for one routing group (pure jax.numpy).

- Load balancing (Switch Transformer, Fedus et al. 2021): E * sum_i f_i P_i.
- Router z-loss (ST-MoE, Zoph et al. 2022): mean_s (logsumexp_i h_s,i)^2.
- Router entropy: a metric, the mean over tokens of the entropy of the routing distribution.
- Symmetric KL of two passes' output distributions (THOR's consistency term, Zuo et al. 2022).

All losses are computed in float32 and returned unweighted; the train step applies the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balance_loss(probs_se: jax.Array, expert_mask_se: jax.Array) -> jax.Array:
  """Switch load-balancing loss, E * sum_i f_i P_i.

  Its minimum over balanced choices is 1 for top-1 routing (and k for top-k with the indicator
  mask), reached when both the choices and the probabilities are uniform over experts.

  Args:
    probs_se: float[S, E] router probabilities (softmax over experts).
    expert_mask_se: [S, E] 0/1 indicator "expert i is among token s's chosen experts", taken from
      the router's choices BEFORE capacity dropping (computing it after dropping underestimates
      the imbalance it is meant to penalise).

  Returns:
    float32 scalar.
  """
  num_experts = probs_se.shape[-1]
  # f_i: fraction of tokens that chose expert i; not differentiable (it comes from an argmax).
  f_e = jnp.mean(expert_mask_se.astype(jnp.float32), axis=0)
  # P_i: mean probability of expert i; the gradient reaches the router through this factor.
  p_e = jnp.mean(probs_se.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f_e * p_e)


def router_z_loss(logits_se: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of (logsumexp over experts of the logits)^2.

  Args:
    logits_se: float[S, E] router logits.

  Returns:
    float32 scalar; it keeps the logits small, where float32 softmax stays accurate.
  """
  lse_s = jax.nn.logsumexp(logits_se.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse_s))


def router_entropy(probs_se: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy (in nats) of the routing distribution; a metric.

  Args:
    probs_se: float[S, E] router probabilities.

  Returns:
    float32 scalar in [0, log E]; log E is a router that has not yet learnt to choose.
  """
  # entr(p) = -p log p with entr(0) = 0, so one-hot rows give 0 and not NaN.
  entropy_s = jnp.sum(jax.scipy.special.entr(probs_se.astype(jnp.float32)), axis=-1)
  return jnp.mean(entropy_s)


def symmetric_kl(
  logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """THOR's consistency term: mean over positions of (KL(p_a || p_b) + KL(p_b || p_a)) / 2.

  Per position it equals (1/2) sum_v (p_a - p_b)(log p_a - log p_b), computed in float32 with
  the logs from log_softmax. Gradients flow into both arguments.

  Args:
    logits_a: float[..., V] output logits of the first pass.
    logits_b: float[..., V] output logits of the second pass (same shape).
    mask: bool or 0/1 [...] positions that count (non-pad targets); None counts all.

  Returns:
    float32 scalar: the masked mean (0 when no position counts).
  """
  if logits_a.shape != logits_b.shape:
    raise ValueError(f"logits shapes differ: {logits_a.shape} vs {logits_b.shape}")
  log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  per_position = 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  if mask is None:
    return jnp.mean(per_position)
  weight = jnp.broadcast_to(mask, per_position.shape).astype(jnp.float32)
  return jnp.sum(per_position * weight) / jnp.maximum(jnp.sum(weight), 1.0)
