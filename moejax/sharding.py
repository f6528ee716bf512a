"""Logical axis names -> mesh axes: the only module that names mesh axes.

Model code annotates parameters (via the `axes` metadata of `nnx.Param`) and activations (via
`constrain`) with logical names; one rules table maps each logical name to zero, one or several
mesh axes. Swapping a parallelism strategy = swapping the table (`mesh.rules` in the config).

Parameter names:  embed, mlp, heads, kv, vocab, expert, expert_embed, expert_mlp
Activation names: batch, length, act_embed, act_mlp, act_heads, act_vocab,
                  group, act_expert, capacity
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. Batch-like activations are split over every axis that does not
# shard them otherwise (so expert-parallel devices do not duplicate attention work); inside the
# MoE layer the routing groups stay on data/fsdp and experts move to 'expert' (GSPMD inserts the
# all-to-all).
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
  "group": ("data", "fsdp"),
  "act_expert": ("expert",),
  "capacity": (),
}

LOGICAL_AXES = tuple(DEFAULT_RULES)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, tuple[str, ...]]] | None] = (
  contextvars.ContextVar("moejax_sharding", default=None)
)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, tuple[str, ...]]) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
  used: set[str] = set()
  parts = []
  for name in names:
    if name is None:
      parts.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
    axes = tuple(a for a in rules[name] if a not in used)
    used.update(axes)
    parts.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*parts)


def mesh_axis_product(
  names: Sequence[str | None], mesh_shape: Mapping[str, int], rules: Mapping[str, tuple[str, ...]]
) -> list[int]:
  """Number of shards along each array dimension for the given logical names."""
  spec = logical_to_spec(names, rules)
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


def state_shardings(state, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  """NamedSharding for every variable of an (abstract) nnx.State, from its logical axes."""
  return jax.tree.map(
    lambda v: NamedSharding(mesh, logical_to_spec(param_axes(v), rules)),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
  """Within this context (and jit traces started in it), `constrain` shards activations."""
  token = _ACTIVE.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Mapping[str, tuple[str, ...]]] | None:
  """(mesh, rules) of the enclosing `activate` context, or None: for ops that map over devices
  (shard_map), which find their mesh axes through the rules, e.g. rules["expert"]."""
  return _ACTIVE.get()


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  """Number of devices along the given mesh axes."""
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `activate` (e.g. unit tests)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if len(names) != x.ndim:
    raise ValueError(
      f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}"
    )
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
