"""Builds the device mesh from the config's `mesh` section (axes data, fsdp, expert, tensor)."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from moejax import sharding


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """A mesh with axes `sharding.MESH_AXES` of the given (resolved) sizes.

  Axis types are Auto (classic GSPMD): shardings are given explicitly to `jax.jit` and through
  `sharding.constrain`, and the compiler propagates the rest.
  """
  devices = jax.devices() if devices is None else devices
  sizes = tuple(shape[a] for a in sharding.MESH_AXES)
  return jax.make_mesh(
    sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes), devices=devices
  )
