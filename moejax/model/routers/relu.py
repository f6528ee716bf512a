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
- `route_relu` returns the penalty WITHOUT lambda as `relu_l1_loss`: lambda is training state,
  so the router (`ReLURouter`) multiplies by stop_gradient(lambda) and reports that product as
  its `relu_l1_loss` (weight option `relu_l1_loss_weight`, 1 = the paper). This keeps the
  routing function stateless and its loss testable alone.
- Deviation: lambda is one float32 `L1Coefficient` variable per MoE layer (checkpointed, outside
  the optimizer, updated in place after routing when training, like DeepSeek's bias), driven by
  that layer's sparsity on the whole batch; the code keeps one lambda for all layers, driven by
  their mean sparsity. Both steer every layer to S* on average; per layer, each layer is steered
  to S* itself. The step's loss uses lambda from before the update.
- Static shapes: the top k_max (`max_experts`) gates are the candidate pairs, valid iff R > 0,
  choice-rank-major like top-k; tokens with more than k_max positive gates are truncated and
  counted (`truncated_fraction`). k_max = E is exact. Early in training (lambda tiny) nearly
  every gate is positive: use k_max = E (or dense compute) there, and 2k later.
- `sparsity` in the metrics is of the full gates, before truncation, as the lambda rule needs.

Integration: `ReLURouter` keeps lambda as a non-parameter variable and updates it when
training (see the deviation above); eval routes with the same ReLU rule and never updates lambda.
Capacity C = ceil(cf * S * k / E) overflows in the first (dense) stage: go dropless or size
capacity for k_max. Each token's gates depend only on that token, so the router is causal in the
'sequence' layout with dropless dispatch (with capacity dispatch and k_max > 1 a later token's
first choice can take the slot of an earlier token's second choice, as in top-k).
Decoding applies the rule to the new token; nothing is cached.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry

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


class L1Coefficient(nnx.Variable):
  """ReMoE's adaptive L1 coefficient lambda: updated by a rule, not by gradients."""


@dataclasses.dataclass(frozen=True)
class ReLUOptions(base.RouterOptions):
  """Options of the `relu` family (`model.moe.relu.*`, ReMoE).

  model.moe.top_k is k of the top-k MoE replaced: the target sparsity is 1 - k/E and the capacity
  ceil(cf * S * k / E) (use the dropless dispatch: the first steps are nearly dense).

  Attributes:
    max_experts: k_max, the static bound of experts per token (<= E; E is exact).
    l1_coef_init: lambda_0 (the code's 1e-8).
    l1_coef_multiplier: alpha > 1 of the lambda update (1.2).
    init_std: standard deviation of the normal kernel init (the scripts' 0.01).
    relu_l1_loss_weight: multiplies lambda * L (1 = the paper).
  """

  max_experts: int = base.option(4, ge=1)
  l1_coef_init: float = base.option(L1_COEF_INIT, gt=0)
  l1_coef_multiplier: float = base.option(L1_COEF_MULTIPLIER, gt=1)
  init_std: float = 0.01
  relu_l1_loss_weight: float = 1.0


@registry.register("relu", aliases=("remoe",))
class ReLURouter(base.DynamicTokenChoiceRouter):
  """ReLU gates over G groups with the adaptive, load-balanced L1 penalty (ReMoE).

  Causal in the 'sequence' layout with the dropless dispatch or max_experts = 1; the lambda
  update uses the whole batch but only changes later steps.
  """

  Options = ReLUOptions
  AUX_LOSSES = ("relu_l1_loss",)

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: ReLUOptions, rngs: nnx.Rngs):
    """Builds the router: a float32 [D, E] kernel and lambda = l1_coef_init."""
    self.check(options, moe)
    self.num_experts = moe.num_experts
    self.top_k = moe.top_k
    self.options = options
    self.target = target_sparsity(moe.top_k, moe.num_experts)
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)
    self.l1_coef = L1Coefficient(jnp.asarray(options.l1_coef_init, jnp.float32), axes=())

  def __call__(self, x_gsd: jax.Array, *, train: bool, rng=None) -> base.SparseRouting:
    """Routes every group; when training, then moves lambda toward the target (in place).

    Returns:
      SparseRouting with [G, N] array fields (N = S * max_experts, valid iff the gate is > 0);
      `relu_l1_loss` = lambda * the load-balanced L1 of the gates (lambda from before the
      update); metrics add `l1_coef` (that lambda) and `target_sparsity`.
    """
    del rng
    l1_coef = jax.lax.stop_gradient(self.l1_coef[...])
    route = functools.partial(route_relu, max_experts=self.options.max_experts, top_k=self.top_k)
    routing = base.route_groups(route, base.router_logits(x_gsd, self.kernel[...]))
    sparsity = jax.lax.stop_gradient(routing.metrics["sparsity"])
    if train:
      self.l1_coef[...] = update_l1_coef(
        l1_coef, sparsity, self.target, self.options.l1_coef_multiplier
      )
    losses = {"relu_l1_loss": l1_coef * routing.aux_losses["relu_l1_loss"]}
    metrics = {
      **routing.metrics,
      "l1_coef": l1_coef,
      "target_sparsity": jnp.asarray(self.target, jnp.float32),
    }
    return dataclasses.replace(routing, aux_losses=losses, metrics=metrics)
