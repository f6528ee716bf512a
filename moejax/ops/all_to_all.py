"""The `all_to_all` dispatch: explicit expert parallelism with `jax.shard_map` over 'expert'.

Same semantics as the `capacity` dispatch (C slots per expert per group, pairs claim slots in
priority order, overflow dropped), with the exchange written out instead of left to GSPMD:

  each shard holds G/X' whole groups (X' = devices of the batch axes, data * fsdp * expert)
  and all routing pairs of them; it fills [g, E, C, D] buffers locally; `all_to_all` over
  'expert' sends expert block j to shard j -> [g * X, E/X, C, D]; its E/X local experts run;
  a second `all_to_all` returns the outputs -> [g, E, C, D]; the combine is local.

Design choices:
- Fixed-capacity exchange with `jax.lax.all_to_all`: the portable path (XLA:CPU has no
  `ragged_all_to_all`). Bytes per exchange per shard: g * E * C * D elements, i.e.
  the capacity slack is also sent. A ragged exchange (GPU/TPU) is not implemented here.
- Mesh axes come from the sharding rules: experts on rules["expert"] (one axis, X devices),
  groups on rules["batch"] (which must include it).
- Expert weights enter the shard_map as P('expert', None, None): a weight sharded on fsdp/tensor
  (EP+FSDP+TP layouts) is all-gathered over those axes at the boundary, FSDP style.
- No mesh, or an 'expert' axis of size 1: the layer falls back to `capacity.capacity_moe`, the
  same function without the exchange, so the model means the same thing on any mesh.

Shapes: G groups, S tokens per group, D d_model, E experts, C capacity, N pairs per group,
X expert-axis size, g groups on one shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.ops import capacity as capacity_ops
from moejax.ops import dropless
from moejax.ops import routing as routing_lib


def _expert_rows_ffn(buf_gecd, weights):
  """The local experts on [g, e, C, D] buffers, run as one matmul per expert on its g * C rows
  (the layout measured fastest on CPU, see moejax/model/experts.py)."""
  g, e, c, d = buf_gecd.shape
  x_end = jnp.swapaxes(buf_gecd, 0, 1).reshape(e, g * c, d)
  # Letters: e experts, n rows of one expert, k input features, j output features.
  matmul = lambda x_enk, w_ekj: jnp.einsum("enk,ekj->enj", x_enk, w_ekj)
  y_end = dropless.grouped_ffn(x_end, weights, matmul)
  return jnp.swapaxes(y_end.reshape(e, g, c, d), 0, 1)


def _local_moe(
  x_gsd,
  token_gn,
  expert_gn,
  weight_gn,
  valid_gn,
  w_in,
  w_gate,
  w_out,
  *,
  activation,
  expert_axis: str,
  num_experts: int,
  capacity: int,
):
  """Body of the shard_map, on one device's groups and local experts."""
  num_tokens = x_gsd.shape[1]
  slot_gn, kept_gn = jax.vmap(
    functools.partial(capacity_ops.compute_slots, num_experts=num_experts, capacity=capacity)
  )(expert_gn, valid_gn)
  buf_gecd = jax.vmap(
    functools.partial(capacity_ops.dispatch, num_experts=num_experts, capacity=capacity)
  )(x_gsd, token_gn, expert_gn, slot_gn, kept_gn)
  # [g, E, C, D] -> [X * g, E / X, C, D]: expert block j goes to shard j, groups stack up.
  recv = jax.lax.all_to_all(buf_gecd, expert_axis, split_axis=1, concat_axis=0, tiled=True)
  weights = {"w_in": w_in, "w_gate": w_gate, "w_out": w_out, "activation": activation}
  out = _expert_rows_ffn(recv, weights)
  out_gecd = jax.lax.all_to_all(out, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  y_gsd = jax.vmap(functools.partial(capacity_ops.combine, num_tokens=num_tokens))(
    out_gecd, token_gn, expert_gn, slot_gn, kept_gn, weight_gn
  )
  return y_gsd.astype(x_gsd.dtype), kept_gn


def all_to_all_moe(
  x_gsd: jax.Array,
  routing: routing_lib.SparseRouting,
  experts,
  *,
  num_experts: int,
  capacity: int,
  rules: sharding.Rules | None = None,
):
  """The `all_to_all` dispatch (same contract and results as `capacity.capacity_moe`).

  Args:
    x_gsd: [G, S, D] tokens; G must be divisible by `group_shards(mesh)`.
    routing: SparseRouting with [G, N] fields.
    experts: the ExpertBank (its `weights()` are used directly).
    num_experts: E, divisible by the 'expert' axis size.
    capacity: C, slots per expert per group.
    rules: sharding rules; the mesh is the context mesh (`jax.set_mesh`). None: no exchange.

  Returns:
    y_gsd in x's dtype, and stats {"dropped_fraction": float32 scalar}.
  """
  mesh = None if rules is None else sharding.context_mesh()
  expert_axes = () if mesh is None else tuple(a for a in rules["expert"] if mesh.shape[a] > 1)
  if not expert_axes:  # no mesh, or experts not split: the same function without exchange
    return capacity_ops.capacity_moe(
      x_gsd, routing, experts, num_experts=num_experts, capacity=capacity, rules=rules
    )
  if len(expert_axes) > 1:
    raise ValueError(f"dispatch 'all_to_all' needs experts on one mesh axis, got {expert_axes}")
  # Each device owns whole groups: they are split over the mesh axes that split the batch.
  group_axes = rules["batch"]
  shards, num_groups = sharding.axes_size(mesh, group_axes), x_gsd.shape[0]
  if num_groups % shards or expert_axes[0] not in group_axes:
    raise ValueError(
      f"dispatch 'all_to_all' needs the {num_groups} routing groups to split evenly over the "
      f"{shards} devices of the batch axes {group_axes} (which must include {expert_axes[0]!r}); "
      "change model.moe.group_size or the batch"
    )
  weights = experts.weights()
  dtype = x_gsd.dtype
  w_in, w_out = weights["w_in"].astype(dtype), weights["w_out"].astype(dtype)
  w_gate = None if weights["w_gate"] is None else weights["w_gate"].astype(dtype)
  g3, g2, w3 = P(group_axes, None, None), P(group_axes, None), P(expert_axes[0], None, None)
  body = functools.partial(
    _local_moe,
    activation=weights["activation"],
    expert_axis=expert_axes[0],
    num_experts=num_experts,
    capacity=capacity,
  )
  y_gsd, kept_gn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(g3, g2, g2, g2, g2, w3, None if w_gate is None else w3, w3),
    out_specs=(g3, g2),
  )(
    x_gsd,
    routing.token_index,
    routing.expert_index,
    routing.combine_weight,
    routing.valid,
    w_in,
    w_gate,
    w_out,
  )
  return y_gsd, {"dropped_fraction": capacity_ops.dropped_fraction(routing.valid, kept_gn)}
