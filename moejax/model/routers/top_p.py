"""Dynamic top-p routing: each token keeps experts until their probabilities pass a threshold.

Huang, An, Zhuang, Tao, Zhang, Jin, Xu, Chen, Huang, Feng, "Harder Tasks Need More Experts:
Dynamic Routing in MoE Models", ACL 2024, arXiv:2403.07652 (reference code:
ZhenweiAn/Dynamic_MoE).

p = softmax(h) over all E experts (float32), sorted decreasingly p_(1) >= ... >= p_(E). Rank j is
kept iff sum_{i<j} p_(i) <= P (an exclusive cumulative sum), i.e. the shortest prefix whose sum
exceeds P, including the expert that crosses P: at least one expert per token. The gates are
the raw p of the kept experts, not renormalised (as in the code). Train and eval route alike.

Design choices:
- Static shapes: a static upper bound k_max (`max_experts`) of experts per token; the top k_max
  probabilities are the candidates and the keep rule gives a `valid` mask (invalid pairs claim
  no capacity). The paper has no bound: with k_max = E it is exact. A token whose k_max
  candidates all pass the rule and still sum to <= P would have kept more: it is counted in the
  metric `truncated_fraction`. The design default is k_max = min(E, 4) (the caller passes it).
- Pairs are choice-rank-major like top-k: pair r*S + s is token s's (r+1)-th candidate.
- Aux losses (unweighted): `dynamic_loss`, the mean over tokens of the entropy of the FULL
  distribution p, with log p from log_softmax (never log of p); minimising it sharpens p so
  fewer experts are needed to pass P. `load_balance_loss`, the Switch form E * sum_e f_e P_e
  with f_e the fraction of tokens whose KEPT set contains e (multi-hot, before any capacity
  drop) and P_e = mean_s p_s,e; at balance it equals the mean number of experts per token.
  The paper's loss weights (recalled a = 1e-2 for balance, b = 1e-4 for the dynamic loss) and
  the exact normalisation of its f_e are unconfirmed: the weights belong to the config.
- Capacity (for the module): C = ceil(cf * S * k_budget / E) with k_budget = 2 (the paper's
  top-2 comparison point), or dropless. Early in training p is near uniform and about E*P + 1
  experts pass the rule: size k_max and the capacity for that, or accept and log truncation.

Integration notes: the layer needs nothing beyond the router logits (a Linear(D, E) without
bias) and a validity-aware dispatch. Per token the kept set depends only on that token, so with
dropless dispatch the router is causal in the 'sequence' group layout; with capacity dispatch
and k_max > 1 a later token's first choice can take the slot of an earlier token's later
choice (as top-k with k > 1), so it is causal only with k_max = 1 or dropless dispatch. At
decode time the rule is applied to the one new token; nothing is cached.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry
from moejax.ops import aux_losses

TOP_P_THRESHOLD = 0.4  # the reference code's `top_p_threshold`


def route_top_p(
  logits_se: jax.Array, *, max_experts: int, threshold: float = TOP_P_THRESHOLD
) -> base.SparseRouting:
  """Dynamic top-p routing of one group.

  Args:
    logits_se: float[S, E] router logits (computed in float32).
    max_experts: k_max, the static bound of experts per token, 1 <= k_max <= E.
    threshold: P in [0, 1): keep experts until their cumulative probability exceeds P.

  Returns:
    SparseRouting with N = S*k_max pairs; pair r*S + s is token s's (r+1)-th most likely expert,
    valid iff kept; combine weight = p of that expert (0 for invalid pairs).
    aux_losses: dynamic_loss (mean entropy of p), load_balance_loss (kept multi-hot set).
    metrics: experts_per_token (mean kept per token), experts_per_token_hist float32[k_max]
      (fraction of tokens keeping j+1 experts), truncated_fraction (tokens k_max cut short),
      expert_load float32[E] (fraction of the kept pairs per expert, before dropping).
  """
  num_experts = logits_se.shape[-1]
  if not 1 <= max_experts <= num_experts:
    raise ValueError(f"need 1 <= {max_experts=} <= {num_experts=}")
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"{threshold=} must be in [0, 1): 0 keeps one expert, 1 would keep all")
  logits_se = logits_se.astype(jnp.float32)
  log_probs_se = jax.nn.log_softmax(logits_se, axis=-1)
  probs_se = jnp.exp(log_probs_se)
  # Shape: [S, K], candidates sorted by decreasing probability.
  prob_sk, expert_sk = base.top_k(probs_se, max_experts)
  # Exclusive prefix sum: the mass of the more likely candidates.
  before_sk = jnp.cumsum(prob_sk, axis=-1) - prob_sk
  keep_sk = before_sk <= threshold
  gate_sk = jnp.where(keep_sk, prob_sk, 0.0)

  # Multi-hot kept set [S, E]: the candidates of a token are distinct experts.
  choice_ske = jax.nn.one_hot(expert_sk, num_experts, dtype=jnp.float32)
  kept_se = jnp.einsum("sk,ske->se", keep_sk.astype(jnp.float32), choice_ske)
  kept_s = jnp.sum(keep_sk, axis=-1)
  # Truncated: even the last candidate was kept and the kept mass is still <= P.
  truncated_s = keep_sk[:, -1] & (before_sk[:, -1] + prob_sk[:, -1] <= threshold)
  losses = {
    "dynamic_loss": -jnp.mean(jnp.sum(probs_se * log_probs_se, axis=-1)),
    "load_balance_loss": aux_losses.load_balance_loss(probs_se, kept_se),
  }
  metrics = {
    "experts_per_token": jnp.mean(kept_s.astype(jnp.float32)),
    "experts_per_token_hist": jnp.mean(
      jax.nn.one_hot(kept_s - 1, max_experts, dtype=jnp.float32), axis=0
    ),
    "truncated_fraction": jnp.mean(truncated_s.astype(jnp.float32)),
    "expert_load": jnp.sum(kept_se, axis=0) / jnp.sum(kept_se),
  }
  return base.rank_major_routing(expert_sk, gate_sk, keep_sk, aux_losses=losses, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class TopPOptions(base.RouterOptions):
  """Options of the `top_p` family (`model.moe.top_p.*`).

  model.moe.top_k is the expert budget the capacity is sized for (the paper compares to top-2):
  C = ceil(cf * S * top_k / E).

  Attributes:
    threshold: P: experts are added until their cumulative probability exceeds P (0.4).
    max_experts: k_max, the static bound of experts per token (<= model.moe.num_experts).
    init_std: standard deviation of the normal kernel init.
    dynamic_loss_weight: weight of the entropy ("dynamic") loss (1e-4, unconfirmed).
    load_balance_loss_weight: weight of the Switch balance loss on the kept sets (1e-2).
  """

  threshold: float = base.option(TOP_P_THRESHOLD, ge=0, lt=1, note="0 keeps one expert")
  max_experts: int = base.option(4, ge=1)
  init_std: float = 0.02
  dynamic_loss_weight: float = 1e-4
  load_balance_loss_weight: float = 1e-2


@registry.register("top_p")
class TopPRouter(base.DynamicTokenChoiceRouter):
  """Linear router + dynamic top-p over G groups (1..max_experts experts per token).

  Causal in the 'sequence' layout with the dropless dispatch or max_experts = 1 (with capacity,
  a later token's first choice can take an earlier token's later choice's slot).
  """

  Options = TopPOptions
  AUX_LOSSES = ("dynamic_loss", "load_balance_loss")

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: TopPOptions, rngs: nnx.Rngs):
    """Builds the router: a float32 [D, E] kernel (`rngs.params`) and the options."""
    self.check(options, moe)
    self.num_experts = moe.num_experts
    self.top_k = moe.top_k  # the capacity budget
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def __call__(self, x_gsd: jax.Array, *, train: bool, rng=None) -> base.SparseRouting:
    """Routes every group (train and eval alike; no noise).

    Returns:
      SparseRouting with [G, N] array fields (N = S * max_experts, `valid` = kept).
    """
    del train, rng
    route = functools.partial(
      route_top_p, max_experts=self.options.max_experts, threshold=self.options.threshold
    )
    return base.route_groups(route, base.router_logits(x_gsd, self.kernel[...]))
