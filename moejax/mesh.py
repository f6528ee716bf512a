"""Builds the device mesh from the config's `mesh` section (axes data, fsdp, expert, tensor).

Hosts: devices inside a host (or TPU slice) talk over the fast interconnect (ICI, NVLink); hosts
talk over the slower data-centre network (DCN). `mesh.dcn` says how many hosts each axis spans;
the axis's remaining factor stays inside a host. The default puts every host on `data` (one
gradient all-reduce per step crosses hosts) and keeps `expert` inside a host (the MoE all-to-all,
twice per MoE layer, never leaves the fast network). One host -> the plain `jax.make_mesh`.
A host here is a TPU slice when devices carry `slice_index` (multi-slice), else a process.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from moejax import sharding
from moejax.errors import ConfigError


def make_mesh(shape: dict[str, int], devices=None, dcn=None, batch_axes=None) -> Mesh:
  """A mesh with axes `sharding.MESH_AXES` of the given (resolved) sizes.

  Axis types are Auto (classic GSPMD): shardings are given explicitly to `jax.jit` and through
  `sharding.constrain`, and the compiler propagates the rest.

  Args:
    shape: resolved total size of every mesh axis.
    devices: the devices (default: all).
    dcn: the config's `mesh.dcn` (hosts per axis, one axis may be -1); None = data crosses hosts.
    batch_axes: the mesh axes that split the batch (rules["batch"]); hosts may only span those
      (see `resolve_dcn_shape`). None: not checked.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = tuple(shape[a] for a in sharding.MESH_AXES)
  auto = (AxisType.Auto,) * len(sizes)
  by_slice = all(getattr(d, "slice_index", None) is not None for d in devices)
  hosts = len({d.slice_index if by_slice else d.process_index for d in devices})
  if hosts == 1:
    return jax.make_mesh(sizes, sharding.MESH_AXES, axis_types=auto, devices=devices)
  dcn_shape = resolve_dcn_shape(shape, dcn, hosts, batch_axes)
  ici = tuple(shape[a] // dcn_shape[a] for a in sharding.MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(
    ici,
    tuple(dcn_shape[a] for a in sharding.MESH_AXES),
    devices,
    process_is_granule=not by_slice,
    allow_split_physical_axes=True,
  )
  return Mesh(np.asarray(grid), sharding.MESH_AXES, axis_types=auto)


def resolve_dcn_shape(shape: dict[str, int], dcn, hosts: int, batch_axes=None) -> dict[str, int]:
  """Hosts per mesh axis: `dcn` with its -1 axis filled so that the product is `hosts`.

  Each host feeds the rows of the global batch its devices hold (read from the batch
  sharding). Hosts spread over an axis that does not split the batch (tensor) would hold the
  same rows and have to feed identical data: such layouts are refused.

  Raises:
    ConfigError: sizes that do not multiply to `hosts`, do not divide their axis, or put hosts
      on an axis outside `batch_axes`.
  """
  dcn = {"data": -1} if dcn is None else dict(dcn)
  dcn = {a: int(dcn.get(a, 1)) for a in sharding.MESH_AXES}
  fill = [a for a, n in dcn.items() if n == -1]
  fixed = math.prod(n for n in dcn.values() if n != -1)
  if len(fill) > 1 or any(n == 0 or n < -1 for n in dcn.values()):
    raise ConfigError(f"mesh.dcn={dcn}: use positive host counts and at most one -1")
  if fill:
    dcn[fill[0]] = hosts // fixed if hosts % fixed == 0 else 0
  if math.prod(dcn.values()) != hosts:
    raise ConfigError(
      f"mesh.dcn={dcn} does not spread the {hosts} hosts over the axes: make the product "
      f"{hosts} (e.g. mesh.dcn.data={hosts} and the others 1)"
    )
  allowed = sharding.MESH_AXES if batch_axes is None else tuple(batch_axes)
  duplicated = [a for a in sharding.MESH_AXES if dcn[a] > 1 and a not in allowed]
  if duplicated:
    raise ConfigError(
      f"mesh.dcn={dcn} spreads hosts over {duplicated}, which do not split the batch "
      f"(batch axes {tuple(batch_axes)}): those hosts would feed identical rows; put the hosts "
      "on batch axes (e.g. mesh.dcn.data)"
    )
  for a in sharding.MESH_AXES:
    if shape[a] % dcn[a]:
      raise ConfigError(
        f"mesh.{a}={shape[a]} cannot span mesh.dcn.{a}={dcn[a]} hosts: make mesh.{a} a multiple "
        f"of {dcn[a]} or move hosts to another axis with mesh.dcn"
      )
  return dcn
