"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Instead of each token picking experts, each expert picks the c tokens of the routing group that
want it most: p = softmax(x W) over experts per token (float32), and expert e takes the top-c
tokens by p[:, e]. Every expert processes exactly c tokens, so the load is balanced by
construction and nothing is dropped; a token may be taken by 0..E experts, and a token taken by
none passes through the residual stream only.

Design choices:
- c = ceil(capacity_factor * S / E), clipped to [1, S] (the same rounding, with the same float
  tolerance, as the token-choice capacity); `capacity(S, cf)` returns this c, so the capacity
  dispatch gives every expert exactly the c slots its c pairs fill and drops nothing.
- Pairs are expert-major: pair e*c + j is expert e's (j+1)-th best token. Within an expert,
  tokens with equal probability are taken lowest position first (jax.lax.top_k's order).
- Combine weight = p(token, expert), not renormalised over the experts that took the token (as
  in the paper); the gradient reaches the router through it.
- No load-balancing loss (balanced by construction); the ST-MoE router z-loss is returned and
  applies when its configured weight is non-zero.
- The router needs c at call time, but the call only says train or eval; so the router holds
  both capacity factors (model.moe.capacity_factor and eval_capacity_factor) and the MoE layer
  asks `capacity` with the same factor, which makes the two agree.
- NOT causal within a sequence: whether token t is taken depends on the later tokens of its
  group. In a decoder use model.moe.group_layout='position' (see docs/causality.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry
from moejax.ops import aux_losses
from moejax.ops import capacity as capacity_lib


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Tokens each expert takes per group: ceil(capacity_factor * S / E), clipped to [1, S].

  Args:
    num_tokens: S, tokens per routing group.
    num_experts: E.
    capacity_factor: mean experts per token; 1.0 processes S tokens in all, the paper uses 2.

  Returns:
    c, a static python int.
  """
  capacity_lib.check_capacity_args(capacity_factor, num_tokens=num_tokens, num_experts=num_experts)
  exact = capacity_factor * num_tokens / num_experts
  return min(num_tokens, max(1, capacity_lib.ceil_slots(exact)))


def route_expert_choice(logits_se: jax.Array, *, capacity: int) -> base.SparseRouting:
  """Expert-choice routing of one group.

  Args:
    logits_se: float[S, E] router logits (computed in float32).
    capacity: c, tokens per expert, 1 <= c <= S.

  Returns:
    SparseRouting with N = E*c pairs, all valid; pair e*c + j is expert e's (j+1)-th choice.
    aux_losses: router_z_loss (float32 scalar).
    metrics: unrouted_fraction (fraction of tokens no expert took), experts_per_token (mean),
      expert_load float32[E] (fraction of the pairs per expert: 1/E by construction),
      router_entropy (float32 scalar).
  """
  num_tokens, num_experts = logits_se.shape
  if not 1 <= capacity <= num_tokens:
    raise ValueError(f"need 1 <= {capacity=} <= num_tokens={num_tokens}")
  logits_se = logits_se.astype(jnp.float32)
  probs_se = jax.nn.softmax(logits_se, axis=-1)
  # Shape: [E, c]: each expert's c most probable tokens, best first. The selection is not
  # differentiable; the weights are gathered from probs so that the gradient flows through them.
  _, token_ec = base.top_k(probs_se.T, capacity)
  expert_ec = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None], token_ec.shape)
  weight_ec = probs_se[token_ec, expert_ec]

  token_n = token_ec.reshape(-1).astype(jnp.int32)
  expert_n = expert_ec.reshape(-1)
  # Shape: [S, E] 0/1: token s taken by expert e (an expert's c tokens are distinct).
  taken_se = jnp.zeros((num_tokens, num_experts), jnp.float32).at[token_n, expert_n].set(1.0)
  experts_s = jnp.sum(taken_se, axis=-1)
  metrics = {
    "unrouted_fraction": jnp.mean((experts_s == 0).astype(jnp.float32)),
    "experts_per_token": jnp.mean(experts_s),
    "expert_load": jnp.sum(taken_se, axis=0) / (num_experts * capacity),
    "router_entropy": aux_losses.router_entropy(probs_se),
  }
  return base.SparseRouting(
    token_index=token_n,
    expert_index=expert_n,
    combine_weight=weight_ec.reshape(-1),
    valid=jnp.ones((num_experts * capacity,), dtype=bool),
    aux_losses={"router_z_loss": aux_losses.router_z_loss(logits_se)},
    metrics=metrics,
  )


@dataclasses.dataclass(frozen=True)
class ExpertChoiceOptions:
  """Options of the `expert_choice` family (`model.moe.expert_choice.*`).

  The tokens each expert takes come from model.moe.capacity_factor (training) and
  model.moe.eval_capacity_factor: c = ceil(cf * S / E).

  Attributes:
    init_std: standard deviation of the normal kernel init.
    router_z_loss_weight: weight of the ST-MoE router z-loss.
  """

  init_std: float = 0.02
  router_z_loss_weight: float = 1e-3


@registry.register("expert_choice")
class ExpertChoiceRouter(base.Router):
  """Linear router + expert-choice selection over G groups.

  Never causal in a sequence: an expert's choice of token t depends on how much the later tokens
  want it.
  """

  Options = ExpertChoiceOptions
  AUX_LOSSES = ("router_z_loss",)
  CAPACITY_RULE = expert_choice_capacity

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: ExpertChoiceOptions, rngs: nnx.Rngs
  ):
    """Builds the router; top_k is unused (capacity_factor is the mean experts per token)."""
    self.options = options
    self.num_experts = moe.num_experts
    self.capacity_factor = moe.capacity_factor
    self.eval_capacity_factor = moe.eval_capacity_factor
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group, N = E*c pairs (each expert takes c = `capacity` tokens, with
    capacity_factor to train, eval_capacity_factor to evaluate); deterministic (no rng)."""
    del rng
    cf = self.capacity_factor if train else self.eval_capacity_factor
    route = functools.partial(route_expert_choice, capacity=self.capacity(x_gsd.shape[1], cf))
    return base.route_groups(route, base.router_logits(x_gsd, self.kernel[...]))
