"""The routing contract: what every router returns and every dispatch consumes (pure jax).

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
    aux_losses: name -> float32 scalar, unweighted; the train step applies the router's weights.
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


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest entries along the last axis and their indices, like `jax.lax.top_k`.

  Built on a stable sort (ties: the lower index first, as `lax.top_k`), because XLA's SPMD
  partitioner keeps a sort sharded along the other axes while it all-gathers the operand of
  the TopK custom call: routing on sharded groups stays where the groups live.

  Args:
    values: [..., M] numbers.
    k: 1 <= k <= M.

  Returns:
    (values [..., k] in decreasing order, int32 indices [..., k]).
  """
  size = values.shape[-1]
  if not 1 <= k <= size:
    raise ValueError(f"top_k needs 1 <= {k=} <= {size}")
  index = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  _, order = jax.lax.sort((-values, index), dimension=values.ndim - 1, num_keys=1, is_stable=True)
  order = order[..., :k]
  return jnp.take_along_axis(values, order, axis=-1), order
