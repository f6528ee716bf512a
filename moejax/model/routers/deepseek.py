"""DeepSeekMoE routing with DeepSeek-V3 auxiliary-loss-free load balancing.

DeepSeekMoE (Dai et al. 2024) splits experts into many small ones (fine-grained experts, more of
them active per token) and adds shared experts every token uses; the shared experts live in
`MoELayer(shared_experts=...)`, this file is the gate. DeepSeek-V3 (2024) gate, per token:
  s = sigmoid(x W_g)                    affinities, float32, [S, E]
  selection score = s + b               b: per-expert bias, used ONLY to choose experts
  (optional) group-limited routing      experts in G_e groups of E/G_e; keep the top_expert_groups
                                        groups by the sum of their top-2 selection scores
  top-k on the selection scores
  weights = s at the chosen experts / their sum * route_scale  (without the division when
                                        normalize_weights is off: V3's norm_topk_prob=False)
After each training step the bias moves toward balance: b_i += gamma * sign(mean_load - load_i),
with load_i the number of this batch's choices (all routing groups) that went to expert i.

Design choices:
- b is a `BalanceBias` variable, not an `nnx.Param`: it is outside the gradient and the optimizer
  (`nnx.split(model, nnx.Param, ...)` puts it in `model_state`), it is checkpointed with the train
  state, and it is stop-gradient'ed where it is read. The update happens in place inside
  `__call__` when train=True; `train_step` carries the changed variable into the next state.
  Selection uses the bias from BEFORE the update, and the update uses the load of this batch,
  so a step's outputs never depend on its own update (the update only affects later steps).
- The load is counted over ALL groups of the batch (outside the per-group vmap) in exact integer
  arithmetic: sign(mean_load - load_i) = sign(total_choices - E * count_i), so an exactly balanced
  expert gets no update (no float rounding turns a tie into +-gamma).
- Group-limited routing scores a group by the sum of its top-2 selection scores (V3 with bias);
  a group of one expert is scored by that expert alone.
- Pair order is choice-rank-major like `TopKRouter` (all first choices, then all second ...), so
  with capacity dispatch and k>1 a later token's first choice can displace an earlier token's
  second choice: causal within a sequence only for k=1 or with the dropless dispatch. The bias
  update uses the batch's load but only changes later steps, so it does not break causality
  within a step.
- Deviation: DeepSeek is dropless; moejax's `capacity` dispatch is not, so
  `capacity(S, cf) = ceil(cf * S * k / E)` as in top-k: use a generous capacity factor
  (configs/deepseek_moe.py uses 2.0) or `model.moe.dispatch='dropless'`.
- Deviation: the V3 sequence-wise balance loss is computed per routing GROUP (S tokens), not per
  sequence: it equals the paper's loss when groups are sequences (group_layout 'sequence' with
  group_size = seq_len); with group_layout 'position' it balances the sequences at one position.
  `sequence_balance_loss` = sum_i f_i P_i with f_i = E/(k S) * (choices of expert i) and
  P_i = mean over tokens of s_i / sum_j s_j; 1 at perfect balance; weight alpha (1e-4) an option.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry


class BalanceBias(nnx.Variable):
  """A per-expert selection bias updated by a rule, not by gradients (not an nnx.Param)."""


def sequence_balance_loss(scores_se: jax.Array, chosen_se: jax.Array, top_k: int) -> jax.Array:
  """DeepSeek-V3 sequence-wise balance loss for one group, sum_i f_i P_i (unweighted).

  Args:
    scores_se: float[S, E] sigmoid affinities s.
    chosen_se: [S, E] 0/1 indicator "expert i is among token s's chosen experts".
    top_k: k.

  Returns:
    float32 scalar; 1 when choices and normalised affinities are uniform over experts.
  """
  num_tokens, num_experts = scores_se.shape
  # f_i = E / (k S) * count_i: 1 for every expert at perfect balance; no gradient (a top-k).
  f_e = num_experts / (top_k * num_tokens) * jnp.sum(chosen_se.astype(jnp.float32), axis=0)
  # P_i: mean normalised affinity; the gradient reaches W_g through it.
  scores_se = scores_se.astype(jnp.float32)
  p_e = jnp.mean(scores_se / jnp.sum(scores_se, axis=-1, keepdims=True), axis=0)
  return jnp.sum(f_e * p_e)


def _group_limit(select_se: jax.Array, num_expert_groups: int, top_expert_groups: int):
  """Sets the selection scores of experts outside each token's best groups to -inf.

  Args:
    select_se: float32[S, E] selection scores s + b.
    num_expert_groups: G_e, dividing E; experts e*E/G_e ... (e+1)*E/G_e - 1 form group e.
    top_expert_groups: groups kept per token.

  Returns:
    float32[S, E] with the experts of dropped groups at -inf.
  """
  num_tokens, num_experts = select_se.shape
  per_group = num_experts // num_expert_groups
  select_sgm = select_se.reshape(num_tokens, num_expert_groups, per_group)
  # A group's score: the sum of its (up to) two best selection scores.
  best_sgm, _ = base.top_k(select_sgm, min(2, per_group))
  group_score_sg = jnp.sum(best_sgm, axis=-1)
  _, keep_group_st = base.top_k(group_score_sg, top_expert_groups)
  keep_sg = jnp.sum(jax.nn.one_hot(keep_group_st, num_expert_groups, dtype=jnp.int32), axis=1) > 0
  keep_se = jnp.repeat(keep_sg, per_group, axis=1)
  return jnp.where(keep_se, select_se, -jnp.inf)


def route_deepseek(
  logits_se: jax.Array,
  bias_e: jax.Array,
  *,
  top_k: int,
  route_scale: float = 1.0,
  num_expert_groups: int = 1,
  top_expert_groups: int = 1,
  normalize_weights: bool = True,
) -> base.SparseRouting:
  """DeepSeek-V3 routing of one group: sigmoid affinities, biased top-k selection.

  Args:
    logits_se: float[S, E] router logits x W_g (computed in float32).
    bias_e: float[E] balance bias b; it changes which experts are chosen, never the weights, and
      no gradient flows into it.
    top_k: k, experts per token.
    route_scale: multiplies the normalised weights (each token's k weights sum to route_scale).
    num_expert_groups: G_e for group-limited routing; 1 = off.
    top_expert_groups: groups kept per token when G_e > 1.
    normalize_weights: divide the k affinities by their sum before `route_scale`.

  Returns:
    SparseRouting with N = S*k pairs; pair r*S + s is token s's (r+1)-th choice.
    aux_losses: sequence_balance_loss (float32 scalar).
    metrics: expert_load float32[E] (fraction of the S*k choices per expert, before dropping),
      router_entropy (mean entropy of the normalised affinities s / sum s).
  """
  num_tokens, num_experts = logits_se.shape
  _check_sizes(num_experts, top_k, num_expert_groups, top_expert_groups)
  scores_se = jax.nn.sigmoid(logits_se.astype(jnp.float32))
  select_se = scores_se + jax.lax.stop_gradient(bias_e.astype(jnp.float32))[None, :]
  if num_expert_groups > 1:
    select_se = _group_limit(select_se, num_expert_groups, top_expert_groups)
  # Shape: [S, K], choices by decreasing selection score.
  _, expert_sk = base.top_k(select_se, top_k)
  gate_sk = jnp.take_along_axis(scores_se, expert_sk, axis=-1)
  if normalize_weights:
    # Sigmoids are positive; the floor only guards against all k underflowing to 0.
    gate_sk = gate_sk / jnp.maximum(jnp.sum(gate_sk, axis=-1, keepdims=True), 1e-30)
  gate_sk = gate_sk * route_scale

  chosen_se = base.chosen_indicator(expert_sk, num_experts)
  norm_se = scores_se / jnp.sum(scores_se, axis=-1, keepdims=True)
  metrics = {
    "expert_load": jnp.mean(chosen_se, axis=0) / top_k,
    "router_entropy": jnp.mean(jnp.sum(jax.scipy.special.entr(norm_se), axis=-1)),
  }
  losses = {"sequence_balance_loss": sequence_balance_loss(scores_se, chosen_se, top_k)}
  return base.rank_major_routing(expert_sk, gate_sk, aux_losses=losses, metrics=metrics)


def bias_update(bias_e: jax.Array, expert_index: jax.Array, valid: jax.Array, rate: float):
  """One aux-loss-free balancing step: b_i + rate * sign(mean_load - load_i).

  Args:
    bias_e: float32[E] the bias used for this batch's selection.
    expert_index: int[..., N] chosen experts of every pair of every group of the batch.
    valid: bool[..., N] pairs that count toward the load.
    rate: gamma.

  Returns:
    (new bias float32[E], count int32[E] of the batch's choices per expert).
  """
  num_experts = bias_e.shape[0]
  count_e = (
    jnp.zeros((num_experts,), jnp.int32)
    .at[expert_index.reshape(-1)]
    .add(valid.reshape(-1).astype(jnp.int32))
  )
  # sign(total / E - count_i) computed as sign(total - E * count_i): exact integers.
  error_e = jnp.sign(jnp.sum(count_e) - num_experts * count_e).astype(jnp.float32)
  return bias_e + rate * error_e, count_e


@dataclasses.dataclass(frozen=True)
class DeepSeekOptions(base.RouterOptions):
  """Options of the `deepseek` family (`model.moe.deepseek.*`).

  Shared experts are a layer option (model.moe.num_shared_experts), not the gate's.

  Attributes:
    route_scale: each token's k weights sum to this (DeepSeek-V3 671B: 2.5), or without
      normalize_weights multiplies the k affinities.
    normalize_weights: divide each token's k affinities by their sum (V3's norm_topk_prob).
    bias_update_rate: gamma of the bias update per training step (V3: 1e-3); 0 freezes b.
    num_expert_groups: G_e, a divisor of E; 1 = no group-limited routing.
    top_expert_groups: groups a token may route to when G_e > 1.
    init_std: standard deviation of the normal kernel init.
    sequence_balance_loss_weight: alpha of the sequence-wise balance loss (V3: 1e-4).
  """

  route_scale: float = base.option(1.0, gt=0)
  normalize_weights: bool = True
  bias_update_rate: float = base.option(1e-3, ge=0)
  num_expert_groups: int = 1
  top_expert_groups: int = 1
  init_std: float = 0.02
  sequence_balance_loss_weight: float = 1e-4


@registry.register("deepseek")
class DeepSeekRouter(base.TokenChoiceRouter):
  """Sigmoid gate + bias-balanced top-k (DeepSeek-V3) over G routing groups.

  Causal as token-choice top-k (see base.TokenChoiceRouter); the bias update uses the whole
  batch's load but only affects later steps.
  """

  Options = DeepSeekOptions
  AUX_LOSSES = ("sequence_balance_loss",)

  @classmethod
  def check(cls, options: DeepSeekOptions, moe: base.MoESettings) -> None:
    try:
      _check_sizes(moe.num_experts, moe.top_k, options.num_expert_groups, options.top_expert_groups)
    except ValueError as e:
      raise errors.ConfigError(f"model.moe.router='deepseek': {e}") from None

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: DeepSeekOptions, rngs: nnx.Rngs
  ):
    """Builds the router: a float32 [D, E] kernel (`rngs.params`), the balance bias (zeros)."""
    _check_sizes(moe.num_experts, moe.top_k, options.num_expert_groups, options.top_expert_groups)
    self.num_experts = moe.num_experts
    self.top_k = moe.top_k
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)
    # Shape: [E]; replicated, float32, starts at 0 (plain top-k by affinity).
    self.bias = BalanceBias(jnp.zeros((moe.num_experts,), jnp.float32), axes=(None,))

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group (N = S*k pairs, deterministic: no rng); when training, then moves the
    bias toward balance (in place).

    Returns:
      Routing as `base.Router.__call__`, plus batch metrics: balance_bias_max_abs (of the bias
      used) and load_max_over_mean (the busiest expert's share of the batch's choices over the
      mean share).
    """
    del rng
    opts = self.options
    bias_e = jax.lax.stop_gradient(self.bias[...])
    route = functools.partial(
      route_deepseek,
      bias_e=bias_e,
      top_k=self.top_k,
      route_scale=opts.route_scale,
      num_expert_groups=opts.num_expert_groups,
      top_expert_groups=opts.top_expert_groups,
      normalize_weights=opts.normalize_weights,
    )
    routing = base.route_groups(route, base.router_logits(x_gsd, self.kernel[...]))
    new_bias_e, count_e = bias_update(
      bias_e, routing.expert_index, routing.valid, opts.bias_update_rate
    )
    if train:
      self.bias[...] = new_bias_e
    count_e = count_e.astype(jnp.float32)
    metrics = {
      **routing.metrics,
      "balance_bias_max_abs": jnp.max(jnp.abs(bias_e)),
      "load_max_over_mean": jnp.max(count_e) / jnp.maximum(jnp.mean(count_e), 1e-30),
    }
    return dataclasses.replace(routing, metrics=metrics)


def _check_sizes(num_experts: int, top_k: int, num_expert_groups: int, top_expert_groups: int):
  if num_expert_groups < 1 or num_experts % num_expert_groups:
    raise ValueError(f"{num_expert_groups=} must be >= 1 and divide {num_experts=}")
  if not 1 <= top_expert_groups <= num_expert_groups:
    raise ValueError(f"need 1 <= {top_expert_groups=} <= {num_expert_groups=}")
  reachable = (
    num_experts
    if num_expert_groups == 1
    else (top_expert_groups * num_experts // num_expert_groups)
  )
  if not 1 <= top_k <= reachable:
    raise ValueError(
      f"need 1 <= {top_k=} <= {reachable} experts reachable ({num_experts=}, "
      f"{num_expert_groups=}, {top_expert_groups=})"
    )
