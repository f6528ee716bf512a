"""The analytic minimum of a train step's collective traffic, per device, for a mesh and config.

Terms (bytes one device sends per step; ring algorithms: all-reduce 2 B (n-1)/n, all-gather and
reduce-scatter B (n-1)/n of the gathered size, all-to-all B (n-1)/n; n devices in the group):
- gradient_reduce: every parameter's gradient summed over the devices that hold its shard and
  saw other data. Over an FSDP axis (a batch axis that shards a non-expert dimension) that is a
  reduce-scatter of the gathered gradient; over the remaining batch axes that do not shard the
  parameter an all-reduce of its shard. The expert dimension needs no reduction over `expert`:
  the tokens of an expert come to its device (the exchange below), so its gradient is local.
- fsdp_gather: every FSDP-sharded parameter all-gathered once (the forward; the backward reuses
  it). Parameters sharded on non-batch axes (tensor) are used sharded and never gathered.
- tensor_parallel: Megatron-style activation all-reduces over the tensor axes: per layer one in
  the forward and one in the backward for attention (heads sharded), the dense MLP (mlp) and
  the experts (expert_mlp, on the T k rows they process), plus the embedding lookup (forward)
  and the unembedding's input gradient (backward) when the vocabulary is sharded.
- expert_exchange: per MoE layer, each of the T k (token, expert) pairs whose expert lives on
  another of the X expert shards goes there and back, forward and backward:
  4 T k D (X-1)/X activation bytes (T tokens of this device; k pairs per token: top-k, or the
  router's pairs per token for expert choice / Soft MoE slots). A capacity buffer sends its
  slack too (its capacity factor times this); that is not in the minimum.
- expert_reach: a family that computes its own output from the expert bank (SMEAR merges all
  E experts for every token, PEER retrieves neurons spread over the whole pool) has no routed
  pairs, but every token needs experts of every expert shard: at least the token to each other
  shard and its partial output back, forward and backward, 4 T D (X-1) per MoE layer. (Moving
  the expert weights to the tokens instead costs a gather and a gradient reduce-scatter of the
  bank, far more for these models.) Such families have no expert_exchange term.
- group_layout: with model.moe.group_layout='position' and routing groups holding sequences
  of several devices (group_size > the device's sequences), the tokens move to the device that
  routes their group and back, forward and backward: 4 T D (n-1)/n per MoE layer over the n
  batch devices. This is the layout's own price (a sequence layout, or groups of the device's
  own sequences, have none).
Routers that run the model several times per step (THOR's consistency passes) multiply every
activation term (tensor_parallel, expert_exchange, expert_reach, group_layout) by the passes;
the gradient is reduced once. Scalar reductions (loss, metrics, norms) are not counted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import routers
from moejax.model.moe_layer import MoELayer
from moejax.model.transformer import Transformer, is_moe_layer


def _axes(part) -> tuple[str, ...]:
  return () if part is None else (part if isinstance(part, tuple) else (part,))


def _size(mesh_shape, axes) -> int:
  return math.prod(mesh_shape[a] for a in axes)


def pairs_per_token(model_cfg) -> float:
  """(token, expert) pairs the dispatch moves per token, from the router's abstract output
  (0 for a family that computes its own output: no dispatch)."""
  moe = model_cfg.moe
  s = moe.group_size
  if routers.get(moe.router).COMPUTES_OUTPUT:
    return 0.0
  per_layer = model_cfg.copy_and_resolve_references()
  per_layer.scan_layers = False  # the routing of one layer does not depend on the layout

  def route():
    model = Transformer(per_layer, rngs=nnx.Rngs(0))
    layer = next(b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer))
    x = jnp.zeros((1, s, model_cfg.d_model), jnp.float32)
    _, routing = layer.route(
      x.reshape(1, s, -1) if moe.group_layout == "sequence" else x.reshape(s, 1, -1),
      train=True,
      rng=jax.random.key(0),
      token_ids_bl=jnp.zeros((1, s) if moe.group_layout == "sequence" else (s, 1), jnp.int32),
    )
    return routing

  routing = jax.eval_shape(route)
  pairs = getattr(routing, "token_index", None)
  if pairs is not None:
    return pairs.shape[-1] / s
  return routing.dispatch_weights.shape[-1] / s  # soft: slots per token


def minimum_bytes(cfg, mesh_shape: dict, rules, abstract_state) -> dict[str, float]:
  """{term: bytes per device per step} (see the module docstring)."""
  m, moe, t = cfg.model, cfg.model.moe, cfg.train
  batch_axes, expert_axes = rules["batch"], rules["expert"]
  n_batch = _size(mesh_shape, batch_axes)
  tokens = t.batch_size * t.seq_len / n_batch
  act = 4 if m.dtype == "float32" else 2
  d = m.d_model
  names = ("gradient_reduce", "fsdp_gather", "tensor_parallel", "expert_exchange")
  terms = dict.fromkeys(names + ("expert_reach", "group_layout"), 0.0)
  for leaf in jax.tree.leaves(abstract_state["params"]):
    spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
    sharded = {a for part in spec for a in _axes(part)}
    local = leaf.size * leaf.dtype.itemsize / _size(mesh_shape, sharded)
    n_fsdp = _size(mesh_shape, [a for a in sharded if a in batch_axes and a not in expert_axes])
    n_rest = _size(mesh_shape, [a for a in batch_axes if a not in sharded])
    terms["gradient_reduce"] += local * (n_fsdp - 1) + 2 * local * (n_rest - 1) / n_rest
    terms["fsdp_gather"] += local * (n_fsdp - 1)
  all_reduce = lambda rows, logical: (
    2 * rows * d * act * (_size(mesh_shape, rules[logical]) - 1) / _size(mesh_shape, rules[logical])
  )
  num_moe = sum(is_moe_layer(i, m.moe_every) for i in range(m.num_layers))
  k = pairs_per_token(m) if num_moe else 0.0
  terms["tensor_parallel"] = (
    2 * m.num_layers * all_reduce(tokens, "heads")
    + 2 * (m.num_layers - num_moe) * all_reduce(tokens, "mlp")
    + 2 * num_moe * all_reduce(tokens * k, "expert_mlp")
    + 2 * all_reduce(tokens, "vocab")
  )
  x = _size(mesh_shape, expert_axes)
  terms["expert_exchange"] = num_moe * 4 * tokens * k * d * act * (x - 1) / x
  if num_moe and routers.get(moe.router).COMPUTES_OUTPUT:
    terms["expert_reach"] = num_moe * 4 * tokens * d * act * (x - 1)
  sequences_per_device = t.batch_size / n_batch
  if num_moe and moe.group_layout == "position" and moe.group_size > sequences_per_device:
    terms["group_layout"] = num_moe * 4 * tokens * d * act * (n_batch - 1) / n_batch
  passes = routers.consistency(moe)[0]
  for name in ("tensor_parallel", "expert_exchange", "expert_reach", "group_layout"):
    terms[name] *= passes
  return terms
