"""ReMoE: ReLU gates with an adaptive, load-balanced L1 penalty steering the sparsity.

Wang, Chen, Zhu, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", 2024 (ICLR
2025), arXiv:2412.14711 (reference code: thu-ml/ReMoE, `ReLURouter` in Megatron).

Gate R(x) = ReLU(x W_r), no bias, no softmax, no top-k, no renormalisation:
y = sum_{e: R_e > 0} R_e(x) E_e(x); a token with R = 0 everywhere is residual only. The gate is
continuous at 0, so the router is fully differentiable and uses 0..E experts per token.

Sparsity is steered by an L1 penalty whose coefficient lambda adapts after every optimizer step:
- sparsity S_t = 1 - (pairs with R > 0) / (tokens * E), target S* = 1 - k/E for the top-k MoE it
  replaces (`target_sparsity`);
- lambda_{t+1} = lambda_t * alpha if S_t < S* else lambda_t / alpha (equality divides), with
  lambda_0 = 1e-8 and alpha = 1.2 (the code's defaults; `update_l1_coef`);
- the penalty is the code's load-balanced L1: f_e = E / (k S) * #{s: R_s,e > 0} (no gradient),
  L = lambda * (1/S) sum_s sum_e f_e R_s,e; with balanced use (all f_e = 1) it is the plain
  mean L1 norm of the gates. It is added for every MoE layer (a sum over layers).

Design choices:
- `route_relu` returns the penalty WITHOUT lambda as `relu_l1_loss`: aux losses in moejax are
  unweighted and lambda is training state (a float32 non-parameter variable, checkpointed, one
  scalar shared by all layers as in the code), so whoever owns lambda multiplies by
  stop_gradient(lambda). This keeps the routing function stateless and its loss testable alone.
- Static shapes: the top k_max (`max_experts`) gates are the candidate pairs, valid iff R > 0,
  choice-rank-major like top-k; tokens with more than k_max positive gates are truncated and
  counted (`truncated_fraction`). k_max = E is exact. Early in training (lambda tiny) nearly
  every gate is positive: use k_max = E (or dense compute) there, and 2k later.
- `sparsity` in the metrics is of the full gates, before truncation, as the lambda rule needs.

Integration notes: the train step must keep lambda and the measured sparsity as non-parameter
state, average the sparsity over MoE layers (and micro-batches and data-parallel ranks) and call
`update_l1_coef` once per optimizer step after the update; eval routes with the same ReLU rule
and never updates lambda. Capacity C = ceil(cf * S * k / E) overflows in the first (dense)
stage: go dropless or size capacity for k_max. Each token's gates depend only on that token, so
the router is causal in the 'sequence' layout with dropless dispatch (with capacity dispatch and
k_max > 1 a later token's first choice can take the slot of an earlier token's second choice, as
in top-k). Decoding applies the rule to the new token; nothing is cached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model.routers import base

L1_COEF_INIT = 1e-8  # lambda_0, the code's `moe_relu_l1_reg_coeff_init`
L1_COEF_MULTIPLIER = 1.2  # alpha, the code's `moe_relu_l1_reg_coeff_multiplier`


def target_sparsity(top_k: int, num_experts: int) -> float:
  """S* = 1 - k/E: the sparsity of the top-k MoE that ReMoE replaces."""
  base.check_top_k(top_k, num_experts)
  return 1.0 - top_k / num_experts


def update_l1_coef(
  l1_coef: jax.Array,
  sparsity: jax.Array,
  target: float,
  multiplier: float = L1_COEF_MULTIPLIER,
) -> jax.Array:
  """One adaptive step of lambda: multiply when too dense (sparsity < target), else divide.

  Args:
    l1_coef: float32 scalar lambda_t.
    sparsity: float32 scalar S_t, measured at this step (averaged over layers).
    target: S*.
    multiplier: alpha > 1.

  Returns:
    float32 scalar lambda_{t+1}.
  """
  l1_coef = jnp.asarray(l1_coef, jnp.float32)
  return jnp.where(sparsity < target, l1_coef * multiplier, l1_coef / multiplier)


def route_relu(logits_se: jax.Array, *, max_experts: int, top_k: int) -> base.SparseRouting:
  """ReLU routing of one group.

  Args:
    logits_se: float[S, E] router logits x W_r (computed in float32).
    max_experts: k_max, the static bound of experts per token, 1 <= k_max <= E.
    top_k: k of the top-k MoE being replaced; it normalises f_e (and sets the target sparsity).

  Returns:
    SparseRouting with N = S*k_max pairs; pair r*S + s is token s's (r+1)-th largest gate,
    valid iff that gate is > 0; combine weight = ReLU gate (0 for invalid pairs).
    aux_losses: relu_l1_loss, the load-balanced L1 penalty WITHOUT the coefficient lambda.
    metrics: sparsity (of all S*E gates), active_experts_per_token (mean positive gates per
      token), truncated_fraction (tokens with more than k_max positive gates), expert_load
      float32[E] (fraction of the positive gates per expert).
  """
  num_tokens, num_experts = logits_se.shape
  base.check_top_k(top_k, num_experts)
  if not 1 <= max_experts <= num_experts:
    raise ValueError(f"need 1 <= {max_experts=} <= {num_experts=}")
  gates_se = jax.nn.relu(logits_se.astype(jnp.float32))
  # Shape: [S, K], the largest gates first.
  gate_sk, expert_sk = base.top_k(gates_se, max_experts)

  active_se = (gates_se > 0).astype(jnp.float32)
  count_e = jnp.sum(active_se, axis=0)
  active_s = jnp.sum(active_se, axis=1)
  # f_e = E/(kS) * count_e: 1 for every expert when each token uses k experts, evenly spread.
  f_e = jax.lax.stop_gradient(num_experts / (top_k * num_tokens) * count_e)
  losses = {"relu_l1_loss": jnp.sum(gates_se * f_e) / num_tokens}
  metrics = {
    "sparsity": 1.0 - jnp.mean(active_se),
    "active_experts_per_token": jnp.mean(active_s),
    "truncated_fraction": jnp.mean((active_s > max_experts).astype(jnp.float32)),
    "expert_load": count_e / jnp.maximum(jnp.sum(count_e), 1.0),
  }
  return base.rank_major_routing(
    expert_sk, gate_sk, gate_sk > 0, aux_losses=losses, metrics=metrics
  )
