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
  groups on rules["group"] (which must include it). The shard_map is manual over the group axes
  only: tensor-parallel axes stay automatic, so a weight sharded on `tensor` is used sharded.
- Expert weights enter as P('expert', None, None) over the manual axes: a weight sharded on fsdp
  is all-gathered over it at the boundary (FSDP), and its gradient summed over the data axes.
- `capacity` makes the same exchange by resharding the buffers (GSPMD: one all-to-all each
  way, the same bytes); `all_to_all` writes it out, which is where a ragged exchange (send only
  the filled slots, `jax.lax.ragged_all_to_all` on GPU/TPU) goes, and it keeps the whole MoE
  body in one explicit per-device program.
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


def on_expert_shards(
  body, x_gsd, routing, weights: dict, *, group_axes, expert_axis, out_specs, check_vma: bool = True
):
  """`body(x_gsd, token_gn, expert_gn, weight_gn, valid_gn, weights)` in a `shard_map` manual over
  the group axes: each device gets its own groups' tokens and pairs and its experts' weights
  (a dict like `ExpertBank.weights()`), cast to the tokens' dtype inside: the weights' gradients
  leave the shard_map (summed over the other group axes) in their storage dtype (XLA:CPU's
  compiler aborts on that all-reduce in bfloat16)."""
  dtype = x_gsd.dtype
  arrays = {k: weights[k] for k in _WEIGHTS}
  g3, g2, w3 = P(group_axes, None, None), P(group_axes, None), P(expert_axis, None, None)
  specs = {k: None if v is None else w3 for k, v in arrays.items()}

  experts = set(expert_axis) if isinstance(expert_axis, tuple) else {expert_axis}
  replicated = tuple(a for a in group_axes if a not in experts)

  def cast(w):
    if check_vma and replicated:  # varying before the cast: the gradient's psum stays float32
      w = jax.lax.pcast(w, replicated, to="varying")
    return w.astype(dtype)

  def local(x_gsd, token_gn, expert_gn, weight_gn, valid_gn, local_weights):
    local_weights = {k: v if v is None else cast(v) for k, v in local_weights.items()}
    local_weights["activation"] = weights["activation"]
    return body(x_gsd, token_gn, expert_gn, weight_gn, valid_gn, local_weights)

  return jax.shard_map(
    local,
    in_specs=(g3, g2, g2, g2, g2, specs),
    out_specs=out_specs,
    axis_names=set(group_axes),
    check_vma=check_vma,
  )(x_gsd, routing.token_index, routing.expert_index, routing.combine_weight, routing.valid, arrays)


_WEIGHTS = ("w_in", "w_gate", "w_out")


def _local_moe(
  x_gsd,
  token_gn,
  expert_gn,
  weight_gn,
  valid_gn,
  weights,
  *,
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
  # Each device owns whole groups (split over the group axes, which include the expert axis);
  # the shard_map is manual over those axes only, so tensor-parallel axes stay automatic.
  group_axes = sharding.group_axes(rules)
  shards, num_groups = sharding.axes_size(mesh, group_axes), x_gsd.shape[0]
  if num_groups % shards or expert_axes[0] not in group_axes:
    raise ValueError(
      f"dispatch 'all_to_all' needs the {num_groups} routing groups to split evenly over the "
      f"{shards} devices of the group axes {group_axes} (which must include {expert_axes[0]!r}); "
      "change model.moe.group_size or the batch"
    )
  body = functools.partial(
    _local_moe, expert_axis=expert_axes[0], num_experts=num_experts, capacity=capacity
  )
  y_gsd, kept_gn = on_expert_shards(
    body,
    x_gsd,
    routing,
    experts.weights(),
    group_axes=group_axes,
    expert_axis=expert_axes[0],
    out_specs=(P(group_axes, None, None), P(group_axes, None)),
  )
  return y_gsd, {"dropped_fraction": capacity_ops.dropped_fraction(routing.valid, kept_gn)}
