"""Per-layer <-> scanned (stacked) parameter trees, for checkpoints of either layout.

A per-layer model keeps layer i under `blocks.{i}`; a scanned one keeps `unit` modules under
`stack.{j}` whose arrays have a leading axis of num_layers / unit entries (moejax/model/blocks.py):
`stack.{j}.X[u]` is `blocks.{u * unit + j}.X`. The functions here rewrite any pytree that holds
such a `blocks` or `stack` dict (parameters, model state, optimizer moments, nested in dicts,
lists, tuples or named tuples) from one layout to the other. Leaves are arrays (stacked with
`jnp.stack`, split by indexing), `jax.ShapeDtypeStruct`s or `NamedSharding`s (for plans and
restore targets: the layer axis is added to or dropped from the shape / partition spec).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PER_LAYER, STACKED = "blocks", "stack"


def layout_of(params: dict) -> str | None:
  """ "blocks" or "stack": which layout a parameter tree (nested dict) is in; None for neither."""
  keys = {str(k) for k in params}
  if STACKED in keys:
    return STACKED
  return PER_LAYER if PER_LAYER in keys else None


def to_layout(tree, layout: str, unit: int | None = None):
  """`tree` with every `blocks` / `stack` dict rewritten into `layout`.

  `unit` (layers per repeating unit) is needed to stack; unstacking reads it from the stack.
  """
  if layout not in (PER_LAYER, STACKED):
    raise ValueError(f"unknown layout {layout!r}; use {PER_LAYER!r} or {STACKED!r}")
  if layout == STACKED and not unit:
    raise ValueError("stacking needs the unit size (layers per scan step)")
  return _rewrite(tree, layout, unit)


def _rewrite(node, layout: str, unit: int):
  if isinstance(node, dict):
    out = {}
    for key, value in node.items():
      name = str(key)
      if name == STACKED and layout == PER_LAYER:
        out[PER_LAYER] = _unstack(value, unit)
      elif name == PER_LAYER and layout == STACKED:
        out[STACKED] = _stack(value, unit)
      else:
        out[key] = _rewrite(value, layout, unit)
    return out
  if isinstance(node, tuple) and hasattr(node, "_fields"):  # named tuples (optax states)
    return type(node)(*(_rewrite(v, layout, unit) for v in node))
  if isinstance(node, (list, tuple)):
    return type(node)(_rewrite(v, layout, unit) for v in node)
  return node


def _index_key(example, i: int):
  """Keys of `nnx.List` children: ints in pure dicts, strings in some restored trees."""
  return str(i) if isinstance(example, str) else i


def _stack(per_layer: dict, unit: int) -> dict:
  """{i: subtree} -> {j: subtree with leaves stacked over u = layers j, j+unit, ...}.

  Trees of non-parameter state hold only some layers (e.g. the MoE layers' router state):
  every unit position present must then be present in every unit.
  """
  layers = sorted(per_layer, key=int)
  num_units = (int(layers[-1]) // unit + 1) if layers else 0
  out = {}
  for j in sorted({int(k) % unit for k in layers}):
    group = [k for k in layers if int(k) % unit == j]
    if [int(k) // unit for k in group] != list(range(num_units)):
      raise ValueError(f"layers {layers} cannot be stacked in units of {unit}")
    out[_index_key(group[0], j)] = jax.tree.map(_stack_leaves, *(per_layer[k] for k in group))
  return out


def _unstack(stacked: dict, unit: int | None) -> dict:
  """{j: subtree with a leading axis of U} -> {u * unit + j: subtree[u]}.

  The unit defaults to the highest position + 1 (a unit ends with its MoE layer, which every
  tree of the model holds).
  """
  keys = sorted(stacked, key=int)
  unit = unit or (int(keys[-1]) + 1 if keys else 1)
  shaped = [x for x in jax.tree.leaves(stacked) if hasattr(x, "shape")]
  num_units = shaped[0].shape[0] if shaped else 0
  out = {}
  for u in range(num_units):
    for key in keys:
      out[_index_key(key, u * unit + int(key))] = jax.tree.map(
        lambda x, u=u: _index_leaf(x, u), stacked[key]
      )
  return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _stack_leaves(*xs):
  x = xs[0]
  if isinstance(x, NamedSharding):
    return NamedSharding(x.mesh, P(None, *x.spec))
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = None if x.sharding is None else _stack_leaves(x.sharding)
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
  return jnp.stack(xs)


def _index_leaf(x, u: int):
  if isinstance(x, NamedSharding):
    return NamedSharding(x.mesh, P(*x.spec[1:]))
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = None if x.sharding is None else _index_leaf(x.sharding, u)
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[u]
