"""BASE layers routing (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse
Models"): a balanced linear assignment of tokens to experts, no auxiliary loss.

Each expert e has a learned centroid w_e (the columns of `centroids` [D, E]); the affinity of
token s for expert e is a[s, e] = x_s . w_e. In training, the S tokens of a routing group are
assigned one expert each so that every expert receives exactly S/E tokens and the total affinity
is maximal (moejax/ops/balanced_assignment.py: an auction finished by negative-cycle
cancelling, in JAX; exact on every problem measured). At evaluation each token takes its
highest-affinity expert (greedy top-1; loads may be unbalanced). The expert output is scaled by
sigmoid(a[s, e_s]), so with the residual the block computes the paper's
x + sigmoid(x . w_e) f_e(x) (the MoE layer's output is added to the residual stream by
transformer.Block; the router only supplies the gate as the combine weight).

Design choices:
- The assignment sees stop_gradient(a): it is discrete and gets no gradient; the gate
  sigmoid(x . w_e) is the only path by which the centroids (and, through them, x) learn.
- Pairs: N = S, pair s = token s with its expert, all valid. In training the load is exactly S/E
  per expert, so `capacity` >= S/E drops nothing.
- Capacity: `capacity(S, cf)` = ceil(cf * S / E) clipped to [S/E, S]. The MoE layer asks with
  `capacity_factor` in training and `eval_capacity_factor` at evaluation, and the router cannot
  tell which; so a recipe sets capacity_factor = 1 (exactly S/E, no wasted slot) and
  eval_capacity_factor = E (C = S: the greedy routing can send the whole group to one expert
  and still nothing is dropped). A smaller eval factor saves eval memory and may drop tokens;
  the capacity dispatch reports `dropped_fraction`.
- Metrics: expert_load [E] (exactly 1/E in training); affinity_ratio = (assigned total - worst
  total) / (greedy total - worst total) over the group, where greedy = sum_s max_e a[s, e] and
  worst = sum_s min_e a[s, e]. This is the plain ratio assigned / greedy made sign-proof (raw
  affinities may be negative): 1 when balancing costs no affinity, 1 at evaluation.
  assignment_optimal: fraction of groups whose assignment is certified optimal (no improving
  cycle of token moves left within `num_iterations` steps; otherwise it is still exactly
  balanced, just possibly not maximal).
- Deviations from the paper / fairseq: experts are the moejax expert MLPs (the paper's experts
  are stacks of transformer layers, one BASE layer per model; here any MoE layer can be BASE);
  the assignment runs per routing group (fixed by config), not over all tokens of all workers,
  and fairseq's random shuffling of tokens across workers before routing is not done; centroids
  start normal(init_std) like the other moejax routers (fairseq: orthogonal, gain 0.1).
- The solver is vmapped over the G groups; its loops run until the slowest group is done, so a
  step costs up to `num_iterations` auction rounds and cancelling steps (timings:
  docs/PERFORMANCE.md).
- NOT causal within a sequence: a token's expert depends on every token of its group. In a
  decoder use model.moe.group_layout='position' (docs/causality.md). S must be a multiple of E.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry
from moejax.ops import balanced_assignment
from moejax.ops import capacity as capacity_lib


def base_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per group: ceil(capacity_factor * S / E), clipped to [S/E, S].

  Args:
    num_tokens: S, tokens per routing group, a multiple of E.
    num_experts: E.
    capacity_factor: 1 fits the balanced training assignment exactly; E fits any greedy
      evaluation routing.

  Returns:
    C, a static python int.
  """
  if num_tokens <= 0 or num_experts <= 0 or num_tokens % num_experts:
    raise ValueError(
      f"BASE layers need num_tokens (group_size) to be a positive multiple of num_experts, got "
      f"{num_tokens=}, {num_experts=}"
    )
  capacity_lib.check_capacity_args(capacity_factor)
  quota = num_tokens // num_experts
  return min(num_tokens, max(quota, capacity_lib.ceil_slots(capacity_factor * quota)))


def route_base(logits_se: jax.Array, *, train: bool, num_iterations: int) -> base.SparseRouting:
  """BASE routing of one group.

  Args:
    logits_se: float[S, E] affinities x . w (float32); S must be a multiple of E in training.
    train: balanced assignment (True) or greedy top-1 (False).
    num_iterations: cap on the solver's auction rounds and cycle-cancelling steps.

  Returns:
    SparseRouting with N = S pairs (pair s = token s), all valid; combine weight
    sigmoid(logits[s, e_s]) (differentiable).
    aux_losses: none.
    metrics: expert_load float32[E], affinity_ratio, assignment_optimal (float32 scalars).
  """
  num_tokens, num_experts = logits_se.shape
  logits_se = logits_se.astype(jnp.float32)
  affinity_se = jax.lax.stop_gradient(logits_se)
  if train:
    expert_s, optimal = balanced_assignment.auction_assignment(affinity_se, num_iterations)
  else:
    expert_s, optimal = jnp.argmax(affinity_se, axis=-1).astype(jnp.int32), jnp.asarray(True)
  # Shape: [S, E] one-hot of each token's expert.
  chosen_se = jax.nn.one_hot(expert_s, num_experts, dtype=jnp.float32)
  gate_s = jax.nn.sigmoid(jnp.sum(chosen_se * logits_se, axis=-1))

  assigned = jnp.sum(chosen_se * affinity_se)
  greedy = jnp.sum(jnp.max(affinity_se, axis=-1))
  worst = jnp.sum(jnp.min(affinity_se, axis=-1))
  span = greedy - worst
  ratio = jnp.where(span > 0, (assigned - worst) / jnp.where(span > 0, span, 1.0), 1.0)
  metrics = {
    "expert_load": jnp.mean(chosen_se, axis=0),
    "affinity_ratio": ratio,
    "assignment_optimal": optimal.astype(jnp.float32),
  }
  return base.SparseRouting(
    token_index=jnp.arange(num_tokens, dtype=jnp.int32),
    expert_index=expert_s,
    combine_weight=gate_s,
    valid=jnp.ones((num_tokens,), dtype=bool),
    aux_losses={},
    metrics=metrics,
  )


_ONE_EXPERT = "assigns exactly one expert per token"


@dataclasses.dataclass(frozen=True)
class BaseOptions(base.RouterOptions):
  """Options of the `base` family (`model.moe.base.*`).

  Attributes:
    num_iterations: cap on the solver's auction rounds and cycle-cancelling steps.
    init_std: standard deviation of the normal centroid init.
  """

  num_iterations: int = base.option(100, ge=0)
  init_std: float = 0.02


@registry.register("base")
class BaseLayersRouter(base.Router):
  """Expert centroids + balanced assignment (training) / greedy top-1 (evaluation).

  Never causal in a sequence: a token's expert depends on the affinities of every token of its
  group.
  """

  Options = BaseOptions
  CAPACITY_RULE = base_capacity

  @classmethod
  def check(cls, options: BaseOptions, moe: base.MoESettings) -> None:
    base.need_one_expert_per_token("base", moe, _ONE_EXPERT)
    if moe.group_size % moe.num_experts:
      raise errors.ConfigError(
        f"model.moe.router='base' needs model.moe.group_size={moe.group_size} to be a multiple "
        f"of model.moe.num_experts={moe.num_experts} (exactly S/E tokens per expert)"
      )

  @classmethod
  def decode_refusal(cls, options, moe: base.MoESettings) -> str | None:
    if moe.group_layout == "sequence":
      return (
        "generation with router 'base' needs model.moe.group_layout='position' (its groups "
        "must hold a multiple of num_experts tokens; one new token per sequence does not)"
      )
    return None

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: BaseOptions, rngs: nnx.Rngs):
    """Builds the router: centroids [D, E] (`rngs.params`) and the options."""
    base.need_one_expert_per_token("base", moe, _ONE_EXPERT)
    self.options = options
    self.num_experts = moe.num_experts
    self.num_iterations = options.num_iterations
    # Shape: [D, E], column e = centroid w_e.
    self.centroids = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group of S (a multiple of E) tokens, N = S pairs: balanced assignment to
    train, greedy top-1 to evaluate; deterministic (no rng), no aux losses."""
    del rng
    num_tokens = x_gsd.shape[1]
    if num_tokens % self.num_experts:
      raise ValueError(
        f"BASE layers need the routing group size {num_tokens} to be a multiple of "
        f"num_experts={self.num_experts}"
      )
    route = functools.partial(route_base, train=train, num_iterations=self.num_iterations)
    return base.route_groups(route, base.router_logits(x_gsd, self.centroids[...]))
