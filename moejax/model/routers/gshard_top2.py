"""GShard top-2 routing with random routing of the second expert (Lepikhin et al. 2020).

Each token takes its most probable expert e1 = argmax p and the best other expert
e2 = argmax p with e1 masked, p = softmax(x W). The two gates are renormalised,
g1 = p_e1 / (p_e1 + p_e2), g2 = p_e2 / (p_e1 + p_e2). At training time the second expert is kept
only if 2 * g2 > u, u ~ U(0, 1) ("random routing": a weak second choice is often skipped, which
saves capacity); at evaluation it is always kept.

Design choices:
- Pair order is the capacity priority: every token's first choice in token order, then every
  (kept) second choice. A second choice that random routing skips stays in the list as an invalid
  pair (`valid=False`, weight 0), so N = 2S is static and it claims no slot.
- The gates are renormalised BEFORE random routing, as in the paper's algorithm, and the first
  gate is not renormalised again when the second choice is skipped or dropped for capacity: the
  token then gets g1 * expert_e1(x) (its residual carries the rest).
- Capacity per expert per group C = ceil(2 * ceil(S / E) * capacity_factor): "2N/E" in the
  paper, with capacity_factor 1 for the paper's setting.
- Aux loss (the paper's l_aux): E * sum_e m_e c_e, m_e = mean gate probability of expert e,
  c_e = fraction of FIRST choices on e, before capacity dropping. Also the ST-MoE z-loss.
- `second_expert_policy`: "random" (the paper) or "all" (always keep e2, plain top-2).
- Not causal within a sequence: a later token's first choice is ranked before an earlier token's
  second choice, so it can push that second choice out of its expert. The recipe
  (configs/gshard_top2.py) therefore groups tokens by position (`group_layout = "position"`): a
  group holds one position of `group_size` sequences and never a sequence's future. Random
  routing itself is per token and causal.
- Router math in float32; the kernel starts normal with a small std (near-uniform routing).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry
from moejax.ops import aux_losses
from moejax.ops import capacity as capacity_lib

SECOND_EXPERT_POLICIES = ("random", "all")


def gshard_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per group: ceil(2 * ceil(S / E) * capacity_factor), at least 1.

  Args:
    num_tokens: S, tokens per routing group.
    num_experts: E.
    capacity_factor: 1.0 is the paper's 2S/E (room for both choices of a balanced routing).

  Returns:
    C, a static python int.
  """
  capacity_lib.check_capacity_args(capacity_factor, num_tokens=num_tokens, num_experts=num_experts)
  per_expert = -(-num_tokens // num_experts)  # ceil(S / E) in integers
  return max(1, capacity_lib.ceil_slots(2 * per_expert * capacity_factor))


def route_gshard_top2(
  logits_se: jax.Array, *, rng: jax.Array | None = None, second_expert_policy: str = "random"
) -> base.SparseRouting:
  """GShard top-2 routing of one group.

  Args:
    logits_se: float[S, E] router logits (computed in float32), E >= 2.
    rng: PRNG key for random routing: u = jax.random.uniform(rng, (S,)) and e2 is kept where
      2 * g2 > u. None keeps every second choice (evaluation).
    second_expert_policy: "random" (random routing when rng is given) or "all" (keep every e2).

  Returns:
    SparseRouting with N = 2S pairs: pair s is token s's first choice (always valid), pair S + s
    its second choice (valid unless random routing skipped it; then its weight is 0).
    aux_losses: load_balance_loss (E * sum_e m_e c_e, first choices), router_z_loss.
    metrics: expert_load float32[E] (fraction of the valid pairs per expert, before capacity
      dropping), router_entropy, second_kept_fraction (fraction of tokens keeping e2).
  """
  num_tokens, num_experts = logits_se.shape
  if num_experts < 2:
    raise ValueError(f"GShard top-2 routing needs at least 2 experts, got {num_experts=}")
  if second_expert_policy not in SECOND_EXPERT_POLICIES:
    raise ValueError(f"{second_expert_policy=} is not one of {SECOND_EXPERT_POLICIES}")
  logits_se = logits_se.astype(jnp.float32)
  probs_se = jax.nn.softmax(logits_se, axis=-1)
  # top_k(p, 2) = (argmax p, argmax p with that expert masked); ties go to the lower index.
  # Shape: [S, 2].
  prob_s2, expert_s2 = base.top_k(probs_se, 2)
  gate_s2 = prob_s2 / jnp.sum(prob_s2, axis=-1, keepdims=True)
  if second_expert_policy == "random" and rng is not None:
    uniform_s = jax.random.uniform(rng, (num_tokens,), jnp.float32)
    keep_second_s = 2.0 * gate_s2[:, 1] > uniform_s
  else:
    keep_second_s = jnp.ones((num_tokens,), dtype=bool)

  valid_s2 = jnp.stack([jnp.ones((num_tokens,), dtype=bool), keep_second_s], axis=1)
  first_se = jax.nn.one_hot(expert_s2[:, 0], num_experts, dtype=jnp.float32)
  claims_e = jnp.einsum(
    "ske,sk->e", jax.nn.one_hot(expert_s2, num_experts, dtype=jnp.float32), valid_s2
  )
  losses = {
    # E * sum_e mean_s(p_se) * mean_s(first choice of s is e).
    "load_balance_loss": aux_losses.load_balance_loss(probs_se, first_se),
    "router_z_loss": aux_losses.router_z_loss(logits_se),
  }
  metrics = {
    "expert_load": claims_e / jnp.sum(claims_e),
    "router_entropy": aux_losses.router_entropy(probs_se),
    "second_kept_fraction": jnp.mean(keep_second_s.astype(jnp.float32)),
  }
  # First choices of all tokens, then the second choices; a skipped second choice has weight 0.
  weight_s2 = jnp.where(valid_s2, gate_s2, 0.0)
  return base.rank_major_routing(expert_s2, weight_s2, valid_s2, aux_losses=losses, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class GShardOptions(base.RouterOptions):
  """Options of the `gshard_top2` family (`model.moe.gshard_top2.*`).

  Attributes:
    second_expert_policy: "random" (random routing at training time, the paper) or "all".
    init_std: standard deviation of the normal kernel init (small: near-uniform routing).
    load_balance_loss_weight: weight of the paper's l_aux (first choices).
    router_z_loss_weight: weight of the ST-MoE router z-loss (not in the paper; 0 turns it off).
  """

  second_expert_policy: str = base.option("random", choices=SECOND_EXPERT_POLICIES)
  init_std: float = 0.02
  load_balance_loss_weight: float = 1e-2
  router_z_loss_weight: float = 1e-3


@registry.register("gshard_top2")
class GShardTop2Router(base.Router):
  """Linear router + GShard top-2 with random routing over G groups.

  Never causal in a sequence: all first choices precede all second choices, so a later token's
  first choice can take the slot an earlier token's second choice would have had. Use
  group_layout 'position'.
  """

  Options = GShardOptions
  AUX_LOSSES = ("load_balance_loss", "router_z_loss")
  CAPACITY_RULE = gshard_capacity

  @classmethod
  def check(cls, options: GShardOptions, moe: base.MoESettings) -> None:
    if moe.top_k != 2 or moe.num_experts < 2:
      raise errors.ConfigError(
        f"model.moe.router='gshard_top2' routes exactly 2 of at least 2 experts; got "
        f"model.moe.top_k={moe.top_k}, model.moe.num_experts={moe.num_experts}"
      )

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: GShardOptions, rngs: nnx.Rngs
  ):
    """Builds the router: a float32 [D, E] kernel (`rngs.params`) and the options."""
    if moe.top_k != 2 or moe.num_experts < 2:
      raise ValueError(f"GShard routes 2 of >= 2 experts, got {moe.top_k=}, {moe.num_experts=}")
    self.num_experts = moe.num_experts
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group, N = 2S pairs; `rng` draws the random routing of second choices
    (training with policy "random"; may be None otherwise)."""
    policy = self.options.second_expert_policy
    route = functools.partial(route_gshard_top2, second_expert_policy=policy)
    logits_gse = base.router_logits(x_gsd, self.kernel[...])
    if train and policy == "random":
      rng = base.need_rng(rng, "the gshard_top2 router with second_expert_policy='random'")
      return base.route_groups(route, logits_gse, rng=rng)
    return base.route_groups(route, logits_gse)
