"""The `capacity` dispatch: fixed-size expert buffers filled by index scatter (pure jax.numpy).

Every expert owns C slots per routing group. The pairs of a `SparseRouting` claim slots in pair
order (the router's priority order: for token choice, all first choices in token order, then all
second choices, ...); a pair whose slot would be >= C is dropped, and a token all of whose pairs
were dropped gets exactly zero MoE output, i.e. it passes through the residual stream only
(Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020).

Design choices:
- Index based: slots come from an exclusive cumulative count of earlier valid claims per expert,
  tokens move by scatter into a flat [E*C, D] buffer and back by gather. No [N, E, C] one-hot
  dispatch tensor is built, so memory stays O(N*E) int work plus O(E*C*D) activations.
- The single-group functions (`compute_slots`, `dispatch`, `combine`) are vmapped over the G
  groups by `capacity_moe`, which also places the sharding constraints around the experts.
- The combine runs in float32 and the result is cast back to the activations' dtype.

Shapes use the moejax alphabet: G groups, S tokens per group, D d_model, E experts,
C capacity per expert, N (token, expert) pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.ops import routing as routing_lib

# Dispatch buffers [G, E, C, D]: filled where their groups live (group-sharded), then exchanged
# so that each device holds its experts' slots of the groups of its `expert_group` (the expert
# axes move from the G dimension to the E dimension: one all-to-all), and back after the experts.
GROUP_BUFFER_AXES = ("group", None, "capacity", "act_embed")
EXPERT_BUFFER_AXES = ("expert_group", "act_expert", "capacity", "act_embed")


def exchange_to_experts(buf_gecd, rules):
  """[G, E, C, D] group-sharded -> expert-sharded (the all-to-all of expert parallelism)."""
  buf_gecd = sharding.constrain(buf_gecd, GROUP_BUFFER_AXES, rules)
  return sharding.constrain(buf_gecd, EXPERT_BUFFER_AXES, rules)


def exchange_to_groups(out_gecd, rules):
  """The inverse of `exchange_to_experts`: expert outputs back to their groups' devices."""
  out_gecd = sharding.constrain(out_gecd, EXPERT_BUFFER_AXES, rules)
  return sharding.constrain(out_gecd, GROUP_BUFFER_AXES, rules)


def check_capacity_args(capacity_factor: float, **sizes: int) -> None:
  """ValueError unless every size (S, E, k, ...) is positive and capacity_factor > 0."""
  if any(size <= 0 for size in sizes.values()):
    shown = ", ".join(f"{name}={size}" for name, size in sizes.items())
    raise ValueError(f"need positive sizes: {shown}")
  if capacity_factor <= 0:
    raise ValueError(f"{capacity_factor=} must be > 0")


def ceil_slots(exact: float) -> int:
  """ceil(exact) up to float rounding: 1.1 * 10 = 11.000000000000002 must not grant one extra
  slot per expert."""
  return math.ceil(exact - 1e-9)


def token_choice_capacity(
  num_tokens: int, num_experts: int, top_k: int, capacity_factor: float
) -> int:
  """Slots per expert for token-choice routing: ceil(capacity_factor * S * k / E), at least 1.

  Args:
    num_tokens: S, tokens per routing group.
    num_experts: E.
    top_k: k, experts chosen per token.
    capacity_factor: 1.0 fits a perfectly balanced routing exactly; more leaves slack.

  Returns:
    C, a static python int.
  """
  check_capacity_args(capacity_factor, num_tokens=num_tokens, num_experts=num_experts, top_k=top_k)
  return max(1, ceil_slots(capacity_factor * num_tokens * top_k / num_experts))


def compute_slots(
  expert_index_n: jax.Array, valid_n: jax.Array, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
  """Each pair's slot in its expert's buffer, and whether it fits.

  Args:
    expert_index_n: int[N] expert of each pair, in pair (priority) order.
    valid_n: bool[N] False for pairs that claim nothing.
    num_experts: E.
    capacity: C.

  Returns:
    slot_n: int32[N] number of earlier valid pairs routed to the same expert.
    kept_n: bool[N] valid & slot < C.
  """
  # Claims [N, E]: 1 where a valid pair targets the expert. Invalid pairs claim nothing, so
  # they never push a later pair out of its slot.
  claims_ne = jax.nn.one_hot(expert_index_n, num_experts, dtype=jnp.int32)
  claims_ne = claims_ne * valid_n.astype(jnp.int32)[:, None]
  # Exclusive prefix count: the claims made by strictly earlier pairs.
  earlier_ne = jnp.cumsum(claims_ne, axis=0) - claims_ne
  slot_n = jnp.take_along_axis(earlier_ne, expert_index_n[:, None].astype(jnp.int32), axis=1)[:, 0]
  kept_n = valid_n & (slot_n < capacity)
  return slot_n.astype(jnp.int32), kept_n


def _flat_slot(expert_index_n, slot_n, kept_n, num_experts, capacity):
  """Row of each pair in the flat [E*C] buffer; dropped pairs point one past the end."""
  flat_n = expert_index_n.astype(jnp.int32) * capacity + slot_n
  return jnp.where(kept_n, flat_n, num_experts * capacity)


def dispatch(
  x_sd: jax.Array,
  token_index_n: jax.Array,
  expert_index_n: jax.Array,
  slot_n: jax.Array,
  kept_n: jax.Array,
  num_experts: int,
  capacity: int,
) -> jax.Array:
  """Copies each kept pair's token into its (expert, slot) of a zero buffer.

  Args:
    x_sd: [S, D] tokens of one group.
    token_index_n: int[N] token of each pair.
    expert_index_n: int[N] expert of each pair.
    slot_n: int32[N] slot of each pair (from `compute_slots`).
    kept_n: bool[N] whether the pair fits its expert.
    num_experts: E.
    capacity: C.

  Returns:
    buf_ecd: [E, C, D] in x's dtype; unused slots are zero.
  """
  dim = x_sd.shape[-1]
  flat_n = _flat_slot(expert_index_n, slot_n, kept_n, num_experts, capacity)
  x_nd = x_sd[token_index_n]
  # Kept pairs have distinct (expert, slot), so adding into zeros equals setting; `add` has the
  # cheaper transpose (a plain gather). Dropped pairs are out of bounds and discarded.
  buf = jnp.zeros((num_experts * capacity, dim), x_sd.dtype)
  buf = buf.at[flat_n].add(x_nd, mode="drop")
  return buf.reshape(num_experts, capacity, dim)


def combine(
  y_ecd: jax.Array,
  token_index_n: jax.Array,
  expert_index_n: jax.Array,
  slot_n: jax.Array,
  kept_n: jax.Array,
  weight_n: jax.Array,
  num_tokens: int,
) -> jax.Array:
  """Sums each token's kept expert outputs, weighted: y_s = sum_n w_n * y[e_n, slot_n].

  Args:
    y_ecd: [E, C, D] expert outputs.
    token_index_n: int[N] token of each pair.
    expert_index_n: int[N] expert of each pair.
    slot_n: int32[N] slot of each pair.
    kept_n: bool[N] whether the pair was dispatched.
    weight_n: float[N] combine weight of each pair.
    num_tokens: S.

  Returns:
    y_sd: float32[S, D]; exactly zero for tokens whose pairs were all dropped.
  """
  num_experts, capacity, dim = y_ecd.shape
  flat_n = _flat_slot(expert_index_n, slot_n, kept_n, num_experts, capacity)
  y_nd = y_ecd.reshape(num_experts * capacity, dim).at[flat_n].get(mode="fill", fill_value=0)
  contrib_nd = y_nd.astype(jnp.float32) * weight_n.astype(jnp.float32)[:, None]
  # `where`, not a multiply by 0: a dropped pair must contribute 0 even if weights are inf/NaN.
  contrib_nd = jnp.where(kept_n[:, None], contrib_nd, 0.0)
  return jnp.zeros((num_tokens, dim), jnp.float32).at[token_index_n].add(contrib_nd)


def dropped_fraction(valid_n: jax.Array, kept_n: jax.Array) -> jax.Array:
  """Fraction of valid pairs that were dropped for lack of capacity (any shape, e.g. [G, N]).

  Returns:
    float32 scalar; 0 when there are no valid pairs.
  """
  num_valid = jnp.sum(valid_n.astype(jnp.float32))
  num_dropped = jnp.sum((valid_n & ~kept_n).astype(jnp.float32))
  return num_dropped / jnp.maximum(num_valid, 1.0)


def capacity_moe(
  x_gsd: jax.Array,
  routing: routing_lib.SparseRouting,
  expert_fn: Callable[[jax.Array], jax.Array],
  *,
  num_experts: int,
  capacity: int,
  rules: sharding.Rules | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dispatches all groups into [G, E, C, D] buffers, runs the experts, combines back.

  Args:
    x_gsd: [G, S, D] tokens.
    routing: SparseRouting whose array fields have a leading G axis ([G, N]).
    expert_fn: maps buf_gecd [G, E, C, D] to outputs of the same shape; expert e must only
      read slice [:, e].
    num_experts: E.
    capacity: C, slots per expert per group.
    rules: sharding rules for the buffer constraints (None: no constraint).

  Returns:
    y_gsd: [G, S, D] in x's dtype, the weighted sum of each token's expert outputs (zero for
      fully dropped tokens; the caller adds it to the residual stream).
    stats: {"dropped_fraction": float32 scalar over all groups}.
  """
  num_tokens = x_gsd.shape[1]

  def fill(x_gsd, token_gn, expert_gn, valid_gn):
    slot_gn, kept_gn = jax.vmap(
      functools.partial(compute_slots, num_experts=num_experts, capacity=capacity)
    )(expert_gn, valid_gn)
    buf_gecd = jax.vmap(functools.partial(dispatch, num_experts=num_experts, capacity=capacity))(
      x_gsd, token_gn, expert_gn, slot_gn, kept_gn
    )
    return buf_gecd, slot_gn, kept_gn

  buf_gecd, slot_gn, kept_gn = sharding.per_group(fill, rules)(
    x_gsd, routing.token_index, routing.expert_index, routing.valid
  )
  out_gecd = expert_fn(exchange_to_experts(buf_gecd, rules))
  if out_gecd.shape != buf_gecd.shape:
    raise ValueError(f"expert_fn returned {out_gecd.shape}, expected {buf_gecd.shape}")
  out_gecd = exchange_to_groups(out_gecd, rules)
  combine_groups = jax.vmap(functools.partial(combine, num_tokens=num_tokens))
  y_gsd = sharding.per_group(combine_groups, rules)(
    out_gecd, routing.token_index, routing.expert_index, slot_gn, kept_gn, routing.combine_weight
  )
  stats = {"dropped_fraction": dropped_fraction(routing.valid, kept_gn)}
  return y_gsd.astype(x_gsd.dtype), stats
