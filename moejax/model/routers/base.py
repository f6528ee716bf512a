"""The routing contract: what every router returns and every dispatch consumes.

Dimension alphabet used across moejax (declared once, used in shapes and einsums):
  B batch, L length, D d_model (embed), F expert hidden, E experts, C capacity per expert,
  K experts per token, G routing groups, S tokens per group, N (token, expert) pairs,
  P slots per expert (Soft MoE), V vocab, H heads.

Routing is computed per group of S tokens. The pure routing functions work on ONE group; the
router modules vmap them over the G groups, so array fields gain a leading G axis, while
`aux_losses` and `metrics` are averaged over groups by `average_over_groups`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.ops import capacity as capacity_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseRouting:
  """A static-length list of (token, expert, weight) pairs for one routing group.

  Pair order is the dispatch priority: when an expert's capacity runs out, earlier pairs keep
  their slot and later pairs are dropped (for token choice: all first choices in token order,
  then all second choices, ...).

  Attributes:
    token_index: int32[N] token position in the group, in [0, S).
    expert_index: int32[N] expert id, in [0, E).
    combine_weight: float32[N] weight of the expert output for that token.
    valid: bool[N] False for pairs that claim nothing (padding, randomly dropped choices).
    aux_losses: name -> float32 scalar, unweighted; the train step applies configured weights.
    metrics: name -> float32 array, for logging only (e.g. per-expert load [E]).
  """

  token_index: jax.Array
  expert_index: jax.Array
  combine_weight: jax.Array
  valid: jax.Array
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  @property
  def num_pairs(self) -> int:
    return self.token_index.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftRouting:
  """Soft MoE routing for one group: every slot is a convex mix of tokens and back.

  Attributes:
    dispatch_weights: float32[S, E*P], softmax over tokens (axis 0) for each slot.
    combine_weights: float32[S, E*P], softmax over slots (axis 1) for each token.
  """

  dispatch_weights: jax.Array
  combine_weights: jax.Array
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


Routing = SparseRouting | SoftRouting


def average_over_groups(routing: Routing) -> Routing:
  """Averages the leading G axis of aux losses and metrics produced by vmapping over groups."""
  mean = lambda tree: jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)
  return dataclasses.replace(
    routing, aux_losses=mean(routing.aux_losses), metrics=mean(routing.metrics)
  )


def router_kernel(rngs: nnx.Rngs, d_model: int, num_experts: int, init_std: float) -> nnx.Param:
  """A float32 [D, E] router matrix, normal(init_std); experts are few, so E stays replicated."""
  init = jax.nn.initializers.normal(stddev=init_std)
  return nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32), axes=("embed", None))


def check_top_k(top_k: int, num_experts: int) -> None:
  """ValueError unless 1 <= top_k <= num_experts."""
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"need 1 <= {top_k=} <= {num_experts=}")


class TokenChoiceRouter(nnx.Module):
  """Base of the routers where each token picks its top_k experts (sets num_experts, top_k)."""

  num_experts: int
  top_k: int

  def capacity(self, num_tokens: int, capacity_factor: float) -> int:
    """Slots per expert per group: ceil(capacity_factor * S * k / E)."""
    return capacity_lib.token_choice_capacity(
      num_tokens, self.num_experts, self.top_k, capacity_factor
    )
