"""The `dropless` dispatch on a mesh; expert-parallel: pairs travel to their experts' devices.

Inside a `jax.shard_map` manual over the group axes (each device holds its own groups and, on
the expert axis of X devices, E/X experts):
  1. the device's M valid-or-not pairs (all its groups pooled) are sorted by destination shard
     j = expert // (E/X), and within a destination by token (the device's groups in order,
     then the tokens of a group); the first B of each destination get a send slot, B = a
     static bound min(M, ceil(exchange_factor * M / X)) (shapes must be static); pairs beyond
     it overflow: they are dropped (zero output, the residual carries the token) and counted.
     Token order keeps training causal in both group layouts (a device's groups follow the
     token stream, or the positions): whether a token's pair is dropped depends only on pairs
     of earlier tokens, never on a later token of its sequence. (Pair order would not: it puts
     every token's first choice before any token's second choice.);
  2. `all_to_all` over the expert axis: [X, B, D] rows (and their local expert ids) go to their
     destinations;
  3. the destination runs its E/X experts on the X * B received rows with the dropless grouped
     matmul (`dropless.dropless_pairs`: blocked on CPU, `ragged_dot` elsewhere);
  4. a second `all_to_all` returns the rows; the source adds weight * output into its tokens.
So no expert bank is replicated and the exchange moves B * X rows per device each way, i.e.
exchange_factor times the pairs of a perfectly balanced routing. A larger factor drops fewer
pairs under imbalance and sends more slack; `dropped_fraction` reports the overflow (0 when the
bound is never reached). Evaluation and decoding pass no factor: the bound is the device's whole
pool, so nothing is dropped (an overflow would make a token's output depend on the other tokens
of the device's pool, later ones included, and on the mesh); its buffers are X times a balanced
exchange's, held for one layer without a backward (choose a capacity `eval_dispatch` to bound
them). A ragged exchange (send only the used rows: `ragged_all_to_all` on GPU/TPU) would remove
the slack; XLA:CPU has none.

Shapes: G groups (g on this device), S tokens per group, D d_model, E experts (e local), N pairs
per group, M = g * N pooled pairs, X expert shards, B rows per destination.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.ops import all_to_all, dropless
from moejax.ops import routing as routing_lib


def send_plan(
  expert_m,
  valid_m,
  rank_m,
  *,
  num_ranks: int,
  num_destinations: int,
  experts_per_shard: int,
  bound: int,
):
  """Where each pair goes: (destination int32[M], slot int32[M], sent bool[M]).

  Within a destination, pairs take slots by increasing `rank_m` (int32[M] in [0, num_ranks);
  equal ranks keep pair order), so which pairs overflow is deterministic: the highest ranks.
  """
  dest_m = (expert_m // experts_per_shard).astype(jnp.int32)
  key_m = jnp.where(valid_m, dest_m, num_destinations)  # invalid pairs sort last, never sent
  if (num_destinations + 1) * num_ranks >= 2**31:  # the combined key is int32
    raise ValueError(f"{num_ranks} ranks x {num_destinations} shards overflow int32 sort keys")
  order = jnp.argsort(key_m * num_ranks + rank_m, stable=True)
  position_m = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  count_j = jnp.zeros((num_destinations + 1,), jnp.int32).at[key_m].add(1)
  start_j = jnp.cumsum(count_j) - count_j
  slot_m = (position_m - start_j[key_m]).astype(jnp.int32)
  sent_m = valid_m & (slot_m < bound)
  return dest_m, slot_m, sent_m


def _local(
  x_gsd,
  token_gn,
  expert_gn,
  weight_gn,
  valid_gn,
  weights,
  *,
  expert_axis,
  num_shards,
  num_experts,
  exchange_factor,
  grouped_matmul,
):
  """Body of the shard_map: this device's groups -> exchange -> local experts -> back."""
  g, s, d = x_gsd.shape
  e_local = num_experts // num_shards
  x_td = x_gsd.reshape(g * s, d)
  token_m = (token_gn + (jnp.arange(g, dtype=jnp.int32) * s)[:, None]).reshape(-1)
  expert_m, weight_m, valid_m = expert_gn.reshape(-1), weight_gn.reshape(-1), valid_gn.reshape(-1)
  pool = token_m.shape[0]
  # None (evaluation): room for the whole pool at one destination, so nothing overflows. A
  # bound above the pool would only send empty rows.
  factor = num_shards if exchange_factor is None else exchange_factor
  bound = max(1, min(pool, math.ceil(factor * pool / num_shards)))
  # Rank = the token's place in the device's groups (see the module docstring: causal drops).
  dest_m, slot_m, sent_m = send_plan(
    expert_m,
    valid_m,
    jnp.clip(token_m, 0, g * s - 1),
    num_ranks=g * s,
    num_destinations=num_shards,
    experts_per_shard=e_local,
    bound=bound,
  )
  # Send rows [X * B]: row dest * B + slot; overflowing pairs point past the end (dropped).
  row_m = jnp.where(sent_m, dest_m * bound + slot_m, num_shards * bound)
  rows = num_shards * bound
  send_x = jnp.zeros((rows, d), x_td.dtype).at[row_m].set(x_td[token_m], mode="drop")
  send_e = jnp.zeros((rows,), jnp.int32).at[row_m].set(expert_m % e_local, mode="drop")
  send_v = jnp.zeros((rows,), bool).at[row_m].set(True, mode="drop")
  exchange = functools.partial(
    jax.lax.all_to_all, axis_name=expert_axis, split_axis=0, concat_axis=0, tiled=True
  )
  recv_x, recv_e, recv_v = exchange(send_x), exchange(send_e), exchange(send_v)
  arange = jnp.arange(rows, dtype=jnp.int32)
  y_rd = dropless.dropless_pairs(
    recv_x,
    arange,
    recv_e,
    jnp.ones((rows,), jnp.float32),
    recv_v,
    weights,
    num_experts=e_local,
    grouped_matmul=grouped_matmul,
  ).astype(x_td.dtype)
  back_rd = exchange(y_rd)
  out_md = back_rd.at[row_m].get(mode="fill", fill_value=0).astype(jnp.float32)
  contrib_md = jnp.where(sent_m[:, None], out_md * weight_m.astype(jnp.float32)[:, None], 0.0)
  y_td = jnp.zeros((g * s, d), jnp.float32).at[token_m].add(contrib_md)
  overflow = jnp.sum((valid_m & ~sent_m).astype(jnp.float32))
  return y_td.reshape(g, s, d).astype(x_gsd.dtype), overflow[None]


def expert_parallel_dropless(
  x_gsd,
  routing,
  weights: dict,
  *,
  num_experts: int,
  rules,
  exchange_factor: float | None,
  grouped_matmul: str | None = None,
):
  """The EP dropless layer (see the module docstring): (y_gsd, {"dropped_fraction"})."""
  mesh = sharding.context_mesh()
  expert_axes = tuple(a for a in rules["expert"] if mesh.shape[a] > 1)
  group_axes = sharding.group_axes(rules)
  if len(expert_axes) != 1 or expert_axes[0] not in group_axes:
    raise ValueError(
      f"expert-parallel dropless needs the experts on one mesh axis that also splits the groups; "
      f"got expert axes {expert_axes}, group axes {group_axes}"
    )
  body = functools.partial(
    _local,
    expert_axis=expert_axes[0],
    num_shards=mesh.shape[expert_axes[0]],
    num_experts=num_experts,
    exchange_factor=exchange_factor,
    grouped_matmul=grouped_matmul,
  )
  y_gsd, overflow = all_to_all.on_expert_shards(
    body,
    x_gsd,
    routing,
    weights,
    group_axes=group_axes,
    expert_axis=expert_axes[0],
    out_specs=(P(group_axes, None, None), P(group_axes)),
    check_vma=False,  # the blocked scan's lax.cond mixes per-device and replicated values
  )
  valid = jnp.maximum(jnp.sum(routing.valid.astype(jnp.float32)), 1.0)
  return y_gsd, {"dropped_fraction": jnp.sum(overflow) / valid}


def dropless_moe(
  x_gsd: jax.Array,
  routing: routing_lib.SparseRouting,
  experts,
  *,
  num_experts: int,
  capacity: int | None = None,
  grouped_matmul: str | None = None,
  rules: sharding.Rules | None = None,
  exchange_factor: float | None = 2.0,
):
  """The `dropless` dispatch (same contract as `capacity.capacity_moe`; `capacity` is unused).

  Args:
    x_gsd: [G, S, D] tokens.
    routing: SparseRouting with [G, N] fields; only `valid` pairs are computed.
    experts: the ExpertBank (its `weights()` are used directly).
    num_experts: E.
    capacity: ignored (no capacity); accepted so every dispatch has one signature.
    grouped_matmul: see `dropless_pairs`.
    rules: sharding rules; the mesh is the context mesh (`jax.set_mesh`). None: one device.
    exchange_factor: with experts split over devices, the per-destination bound of the
      exchange in units of a balanced routing's pairs (see the module docstring); None: room
      for all of a device's pairs at one destination (never drops; `MoELayer` at evaluation).

  Returns:
    y_gsd in x's dtype, and stats {"dropped_fraction"}: 0 unless expert-parallel pairs
    overflowed the exchange bound.
  """
  del capacity
  weights = experts.weights()
  group_axes = sharding.group_axes(rules)
  if not group_axes:
    y_gsd = dropless.dropless_groups(
      x_gsd,
      routing.token_index,
      routing.expert_index,
      routing.combine_weight,
      routing.valid,
      weights,
      num_experts=num_experts,
      grouped_matmul=grouped_matmul,
    )
    return y_gsd.astype(x_gsd.dtype), {"dropped_fraction": jnp.zeros((), jnp.float32)}
  mesh = sharding.context_mesh()
  shards = sharding.axes_size(mesh, group_axes)
  if x_gsd.shape[0] % shards:
    raise ValueError(
      f"dispatch 'dropless' needs the {x_gsd.shape[0]} routing groups to split evenly over the "
      f"{shards} devices of {group_axes}; change model.moe.group_size or the batch"
    )
  if any(mesh.shape[a] > 1 for a in rules["expert"]):
    return expert_parallel_dropless(
      x_gsd,
      routing,
      weights,
      num_experts=num_experts,
      rules=rules,
      exchange_factor=exchange_factor,
      grouped_matmul=grouped_matmul,
    )
  # Experts not split: each device pools its own groups and uses the whole bank (a weight
  # sharded on fsdp or tensor is all-gathered at the boundary, as FSDP does).
  local = functools.partial(
    dropless.dropless_groups, num_experts=num_experts, grouped_matmul=grouped_matmul
  )
  g3, g2 = P(group_axes, None, None), P(group_axes, None)
  arrays = {k: v for k, v in weights.items() if k != "activation"}
  y_gsd = jax.shard_map(
    lambda *a: local(*a[:5], {**a[5], "activation": weights["activation"]}),
    in_specs=(g3, g2, g2, g2, g2, {k: None if v is None else P() for k, v in arrays.items()}),
    out_specs=g3,
    axis_names=set(group_axes),
    check_vma=False,  # the blocked scan's lax.cond mixes per-device and replicated values
  )(x_gsd, routing.token_index, routing.expert_index, routing.combine_weight, routing.valid, arrays)
  return y_gsd.astype(x_gsd.dtype), {"dropped_fraction": jnp.zeros((), jnp.float32)}
