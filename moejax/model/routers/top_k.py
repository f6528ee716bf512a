"""Token-choice top-k routing: Switch Transformer (k=1) and general top-k (k>1).

Each token picks the k experts with the largest router probability p = softmax(x W)
(Switch Transformer, Fedus et al. 2021; GShard / ST-MoE for k>1, Zoph et al. 2022).

Design choices:
- Gate value = p at the chosen expert, not renormalised for k=1 (the gradient reaches the router
  through it); for k>1 renormalising over the chosen k (Mixtral, Qwen) is an option.
- Pairs are ordered choice-rank-major: all first choices in token order, then all second
  choices, ... so that under capacity pressure a token's first choice beats any second choice.
- Router math is float32 whatever the activation dtype (ST-MoE: bfloat16 routers are unstable).
- Aux losses: Switch load balancing from the choices before any capacity dropping (indicator
  "i among the chosen" for k>1), and the ST-MoE z-loss.
- Optional multiplicative jitter U[1-eps, 1+eps] on the router input at training time.
- Optional batch-prioritized routing (V-MoE, `batch_prioritized`; priority.py): within each
  choice rank, tokens claim capacity by decreasing top-1 probability instead of position. It
  lets a later, more confident token take an earlier token's slot, so with the capacity
  dispatches it is not causal in the 'sequence' layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, priority, registry
from moejax.ops import aux_losses


def route_top_k(
  logits_se: jax.Array, *, top_k: int, normalize_weights: bool = False
) -> base.SparseRouting:
  """Token-choice top-k routing of one group.

  Args:
    logits_se: float[S, E] router logits (computed in float32).
    top_k: k, experts per token, 1 <= k <= E.
    normalize_weights: renormalise the k gate values of each token to sum to 1.

  Returns:
    SparseRouting with N = S*k pairs; pair r*S + s is token s's (r+1)-th choice.
    aux_losses: load_balance_loss, router_z_loss (float32 scalars).
    metrics: expert_load float32[E] (fraction of the S*k choices per expert, before dropping),
      router_entropy (float32 scalar).
  """
  logits_se = logits_se.astype(jnp.float32)
  probs_se, gate_sk, expert_sk, chosen_se = base.softmax_top_k(
    logits_se, top_k, normalize=normalize_weights
  )
  losses = {
    "load_balance_loss": aux_losses.load_balance_loss(probs_se, chosen_se),
    "router_z_loss": aux_losses.router_z_loss(logits_se),
  }
  metrics = {
    "expert_load": jnp.mean(chosen_se, axis=0) / top_k,
    "router_entropy": aux_losses.router_entropy(probs_se),
  }
  return base.rank_major_routing(expert_sk, gate_sk, aux_losses=losses, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class TopKOptions(base.RouterOptions):
  """Options of the `switch` family (`model.moe.switch.*`).

  Attributes:
    jitter_eps: training-time multiplicative noise U[1-eps, 1+eps] on the router input; 0 off.
    normalize_weights: renormalise each token's k gate values to sum to 1 (Mixtral, Qwen).
    batch_prioritized: capacity goes to the most confident tokens first (V-MoE; flaxformer's
      `batch_prioritized_routing`), not the earliest positions.
    init_std: standard deviation of the normal kernel init (small: near-uniform routing).
    load_balance_loss_weight: weight of the Switch load-balancing loss.
    router_z_loss_weight: weight of the ST-MoE router z-loss.
  """

  jitter_eps: float = base.option(0.0, ge=0, lt=1)
  normalize_weights: bool = False
  batch_prioritized: bool = False
  init_std: float = 0.02
  load_balance_loss_weight: float = 1e-2
  router_z_loss_weight: float = 1e-3


@registry.register("switch", aliases=("top_k",))
class TopKRouter(base.TokenChoiceRouter):
  """Linear router + token-choice top-k over G groups (Switch when top_k=1)."""

  Options = TopKOptions
  AUX_LOSSES = ("load_balance_loss", "router_z_loss")

  @classmethod
  def causal_in_sequence(cls, options: TopKOptions, moe: base.MoESettings) -> bool:
    """Token choice's rule, except that batch-prioritized capacity ranks a group's tokens by
    confidence, later tokens included (causal only when nothing competes: dropless)."""
    if options.batch_prioritized:
      return moe.dispatch == "dropless"
    return super().causal_in_sequence(options, moe)

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: TopKOptions, rngs: nnx.Rngs):
    """Builds the router: a float32 [D, E] kernel (`rngs.params`) and the options."""
    base.check_top_k(moe.top_k, moe.num_experts)
    self.num_experts = moe.num_experts
    self.top_k = moe.top_k
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group (N = S*k pairs); `rng` draws the jitter (training with jitter_eps)."""
    x_gsd = x_gsd.astype(jnp.float32)
    eps = self.options.jitter_eps
    if train and eps > 0:
      rng = base.need_rng(rng, f"the switch router with jitter_eps={eps}")
      x_gsd = x_gsd * jax.random.uniform(rng, x_gsd.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    route = functools.partial(
      route_top_k, top_k=self.top_k, normalize_weights=self.options.normalize_weights
    )
    if self.options.batch_prioritized:
      route = functools.partial(_prioritized, route)
    return base.route_groups(route, base.router_logits(x_gsd, self.kernel[...]))


def _prioritized(route, logits_se: jax.Array) -> base.SparseRouting:
  """`route(logits_se)` with tokens ordered by their top-1 probability (priority.py)."""
  probs_se = jax.nn.softmax(logits_se.astype(jnp.float32), axis=-1)
  return priority.batch_prioritized(route(logits_se), jnp.max(probs_se, axis=-1))
