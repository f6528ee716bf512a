"""Logical axis names -> mesh axes: the only module that names mesh axes.

Model code annotates parameters (the `axes` metadata of `nnx.Param`) and activations
(`constrain(x, names, rules)`) with logical names; a `Rules` table maps each logical name to zero,
one or several mesh axes. Swapping a parallelism strategy = swapping the table (`mesh.rules` in
the config).

What decides the traced program is visible to `jax.jit`: the rules are a static part of the model
(modules hold them, so they are in the graph definition the step closes over) and the mesh is
JAX's own context (`jax.set_mesh(mesh)`, part of every jit cache key). A model built with
`rules=None` has no sharding constraints (one device, unit tests); a model built with rules must
be traced inside `jax.set_mesh`, or `constrain` raises.

Parameter names:  embed, mlp, heads, kv, vocab, expert, expert_embed, expert_mlp
Activation names: batch, length, act_embed, act_mlp, act_heads, act_vocab,
                  group, expert_group, act_expert, capacity
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. Batch-like activations are split over every axis that does not
# shard them otherwise (so expert-parallel devices do not duplicate attention work). Inside the
# MoE layer the routing groups keep the batch's sharding (`group`: every device routes its own
# groups); the dispatch buffers then move from `group` to `expert_group` x `act_expert`: the
# expert axes leave the group dimension for the expert dimension, which is one all-to-all.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
  # parameters
  "embed": ("fsdp",),
  "mlp": ("tensor",),
  "heads": ("tensor",),
  "kv": (),
  "vocab": ("tensor",),
  "expert": ("expert",),
  "expert_embed": ("fsdp",),
  "expert_mlp": ("tensor",),
  # activations
  "batch": ("data", "fsdp", "expert"),
  "length": (),
  "act_embed": (),
  "act_mlp": ("tensor",),
  "act_heads": ("tensor",),
  "act_vocab": ("tensor",),
  "group": ("data", "fsdp", "expert"),
  "expert_group": ("data", "fsdp"),
  "act_expert": ("expert",),
  "capacity": (),
}

LOGICAL_AXES = tuple(DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class Rules:
  """An immutable, hashable logical-name -> mesh-axes table.

  Attributes:
    table: ((logical name, (mesh axis, ...)), ...).
  """

  table: tuple[tuple[str, tuple[str, ...]], ...]

  @classmethod
  def of(cls, mapping: Mapping[str, Sequence[str]]) -> Rules:
    return cls(tuple((name, tuple(axes)) for name, axes in mapping.items()))

  def __getitem__(self, name: str) -> tuple[str, ...]:
    for key, axes in self.table:
      if key == name:
        return axes
    raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(k for k, _ in self.table)}")

  def as_dict(self) -> dict[str, tuple[str, ...]]:
    return dict(self.table)

  def spec(self, names: Sequence[str | None]) -> P:
    """A PartitionSpec for the logical names; a mesh axis is used at most once per spec."""
    used: set[str] = set()
    parts = []
    for name in names:
      if name is None:
        parts.append(None)
        continue
      axes = tuple(a for a in self[name] if a not in used)
      used.update(axes)
      parts.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*parts)


DEFAULT = Rules.of(DEFAULT_RULES)


def axis_sizes(spec: P, mesh_shape: Mapping[str, int]) -> list[int]:
  """Number of shards along each array dimension of a PartitionSpec."""
  out = []
  for part in spec:
    axes = () if part is None else (part if isinstance(part, tuple) else (part,))
    n = 1
    for a in axes:
      n *= mesh_shape.get(a, 1)
    out.append(n)
  return out


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  """Logical axes of a variable (`axes` metadata); unannotated variables are replicated."""
  axes = getattr(variable, "axes", None)
  return tuple(axes) if axes is not None else (None,) * len(variable.shape)


def state_shardings(state, mesh: Mesh, rules: Rules):
  """NamedSharding for every variable of an (abstract) nnx.State, from its logical axes."""
  return jax.tree.map(
    lambda v: NamedSharding(mesh, rules.spec(param_axes(v))),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def axes_size(mesh, axes: Sequence[str]) -> int:
  """Number of devices along the given mesh axes (a Mesh or an AbstractMesh)."""
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def context_mesh():
  """The mesh of the enclosing `jax.set_mesh` (an AbstractMesh while tracing)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(
      "a model built with sharding rules runs inside `with jax.set_mesh(mesh):` (no mesh is set)"
    )
  return mesh


def group_axes(rules: Rules | None) -> tuple[str, ...]:
  """The mesh axes (of more than one device) that split the routing groups; () without rules."""
  if rules is None:
    return ()
  mesh = context_mesh()
  return tuple(a for a in rules["group"] if mesh.shape[a] > 1)


def group_shards(rules: Rules | None) -> int:
  """Devices the routing groups are split over (1 without rules)."""
  if rules is None:
    return 1
  mesh = context_mesh()
  return math.prod(mesh.shape[a] for a in group_axes(rules))


def per_group(fn, rules: Rules | None):
  """`fn` run where each routing group lives: a `shard_map` manual over the group axes.

  Every argument and result of `fn` has a leading group axis [G, ...]; `fn` must treat groups
  independently (vmapped per-group code). XLA's partitioner does not always keep such code
  sharded (the backward of a batched gather can all-reduce a full [G, ...] buffer); this makes
  the locality explicit. The other mesh axes (tensor) stay automatic. Without rules, or with
  groups on one device, `fn` itself.
  """
  axes = group_axes(rules)
  if not axes:
    return fn
  spec = P(axes)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, axis_names=set(axes), check_vma=False)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None) -> jax.Array:
  """with_sharding_constraint by logical names on the context mesh; nothing when rules is None."""
  if rules is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of {x.shape}")
  context_mesh()
  return jax.lax.with_sharding_constraint(x, rules.spec(names))
