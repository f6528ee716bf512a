"""Restore a trained model for use: the run's config, a mesh, and the parameters of a checkpoint.

Shared by `evaluate`, `generate` and `upcycle`. Design choices:
- A run's config is saved as WORKDIR/config.json when training starts, so a workdir alone is
  enough to rebuild the model; keys missing from an older file take their defaults.
- Only `params` and `model_state` (and `step`) are read from a checkpoint (an Orbax partial
  restore), never the optimizer moments: inference needs a third of a training state's memory.
- The arrays are restored straight onto the target mesh's shardings (from the logical-axis rules),
  so a checkpoint written on one mesh is used on any other, e.g. 8 devices -> 1.
- A checkpoint of a scanned model restores into a per-layer one and vice versa: the arrays are
  read in the layout they were saved in and restacked on the device (moejax/model/layout.py).
- User errors (no checkpoint, unknown step, a mesh that does not fit) raise
  `errors.ConfigError` with one line; `moejax.cli.run` turns them into "moejax: error: ..."
  exit 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import config_lib, errors, paths, sharding
from moejax import mesh as mesh_lib
from moejax.model import layout
from moejax.model.blocks import unit_size
from moejax.model.transformer import Transformer

RUN_CONFIG = "config.json"  # written by moejax.train (checkpoint.write_config)


def load_run_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with.

  The run's `extensions` are imported first (they may register its router or data source);
  a key this version of moejax does not know is refused in one line.
  """
  path = paths.resolve(workdir) / RUN_CONFIG
  if not path.exists():
    raise errors.ConfigError(
      f"no {RUN_CONFIG} in {str(workdir)!r}: pass the --workdir of a moejax.train run (runs "
      "write their config there when they start)"
    )
  saved = json.loads(path.read_text())
  config_lib.import_extensions(saved.get("extensions", ""))
  cfg = config_lib.default_config()
  try:
    _merge(cfg, saved)
  except (AttributeError, KeyError, TypeError) as e:
    raise errors.ConfigError(
      f"{path} does not fit this version of moejax ({str(e).splitlines()[0]}); it was written "
      "by another version: retrain, or convert the config by hand"
    ) from None
  return cfg


def _merge(cfg, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      _merge(cfg[key], value)
    else:
      cfg[key] = value


def checkpoint_location(path) -> tuple[epath.Path, int | None]:
  """(checkpoints directory, step or None = latest) for a workdir, its checkpoints/ or a step."""
  path = paths.resolve(path)
  if path.name.isdigit() and path.is_dir():
    return path.parent, int(path.name)
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name == "checkpoints" and path.is_dir():
    return path, None
  raise errors.ConfigError(
    f"no checkpoints at {str(path)!r}: give a run's workdir, WORKDIR/checkpoints or "
    "WORKDIR/checkpoints/<step>"
  )


def open_checkpoints(directory) -> ocp.CheckpointManager:
  """A read-only manager whose `state` item can be partially restored and inspected."""
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )


def pick_step(manager: ocp.CheckpointManager, step: int | None, directory: str) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise errors.ConfigError(f"no finished checkpoint in {str(directory)!r}; train first")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise errors.ConfigError(f"step {step} is not in {str(directory)!r}; saved steps: {steps}")
  return step


def saved_param_shapes(path, step: int | None = None) -> tuple[dict[str, tuple], int]:
  """{'blocks.1.ffn.w_in': shape, ...} of the parameters saved at `path` (no array is read)."""
  directory, loc_step = checkpoint_location(path)
  manager = open_checkpoints(directory)
  step = pick_step(manager, step if step is not None else loc_step, directory)
  tree = manager.item_metadata(step)["state"].tree["params"]
  manager.close()
  return {name: tuple(x.shape) for name, x in flatten(tree).items()}, step


def flatten(tree, prefix: str = "") -> dict:
  """Nested dict -> {'a.b.c': leaf} (keys as strings, so int and str keys read the same)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def with_layout(model_cfg, params_layout: str):
  """A copy of the `model` config whose parameters are in `params_layout` (layout.STACKED or
  layout.PER_LAYER)."""
  out = copy.deepcopy(model_cfg)
  out.scan_layers = params_layout == layout.STACKED
  return out


def params_layout(model_cfg) -> str:
  """The parameter layout of models built from this `model` config."""
  return layout.STACKED if model_cfg.scan_layers else layout.PER_LAYER


def abstract_model(model_cfg, seed: int = 0, rules: sharding.Rules | None = None):
  """(graphdef, params, rest) of the model, abstract (`nnx.eval_shape`)."""
  model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed), rules=rules))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def make_inference_mesh(cfg, devices=None, mesh_overrides: dict | None = None):
  """Validates `cfg` for these devices and returns (mesh, rules).

  The saved mesh is kept when it fits the devices; otherwise every device goes on 'data'.
  `mesh_overrides` ({'data': 2, 'expert': 4}) replaces mesh sizes; unspecified axes become 1.
  """
  devices = jax.devices() if devices is None else list(devices)
  if mesh_overrides:
    for axis in sharding.MESH_AXES:
      cfg.mesh[axis] = int(mesh_overrides.get(axis, 1))
  else:
    try:
      config_lib.resolve_mesh_shape(cfg.mesh, len(devices))
    except errors.ConfigError:
      for axis in sharding.MESH_AXES:
        cfg.mesh[axis] = -1 if axis == "data" else 1
  shape = config_lib.validate(cfg, len(devices))
  return mesh_lib.make_mesh(shape, devices), config_lib.rules_from_config(cfg.mesh)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,expert=4' -> {'data': 2, 'expert': 4}."""
  out = {}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if axis not in sharding.MESH_AXES or not size.lstrip("-").isdigit():
      raise errors.ConfigError(
        f"--mesh {text!r}: expected comma-separated axis=size with axes {sharding.MESH_AXES}"
      )
    out[axis] = int(size)
  return out


@dataclasses.dataclass
class RestoredModel:
  """A model ready for inference: `nnx.merge(graphdef, params, model_state)` rebuilds it."""

  graphdef: nnx.GraphDef
  params: dict
  model_state: dict
  step: int
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules


def restore_model(path: str, cfg, mesh, rules, step: int | None = None) -> RestoredModel:
  """Restores `params` and `model_state` of a checkpoint onto `mesh` (any shape).

  Args:
    path: a run's workdir, WORKDIR/checkpoints, or WORKDIR/checkpoints/<step>.
    cfg: the run's config (`load_run_config`), validated for `mesh`.
    step: the step to restore; default the one in `path` or the latest.
  """
  directory, loc_step = checkpoint_location(path)
  manager = open_checkpoints(directory)
  step = pick_step(manager, step if step is not None else loc_step, directory)
  graphdef, abs_params, abs_rest = abstract_model(cfg.model, cfg.train.seed, rules)
  wanted = params_layout(cfg.model)
  saved = layout.layout_of(manager.item_metadata(step)["state"].tree["params"]) or wanted
  if saved != wanted:  # read the arrays as saved, restack below
    _, abs_params, abs_rest = abstract_model(with_layout(cfg.model, saved), cfg.train.seed, rules)
  to_target = lambda state: jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nnx.to_pure_dict(state),
    nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules)),
  )
  target = {
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
    "params": to_target(abs_params),
  }
  rest = to_target(abs_rest)
  if jax.tree.leaves(rest):  # an empty subtree cannot be restored partially
    target["model_state"] = rest
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  out = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    ),
  )["state"]
  manager.close()
  params, model_state = out["params"], out.get("model_state", rest)
  if saved != wanted:
    _, want_params, want_rest = abstract_model(cfg.model, cfg.train.seed, rules)
    shardings = tuple(
      nnx.to_pure_dict(sharding.state_shardings(s, mesh, rules)) for s in (want_params, want_rest)
    )
    convert = lambda tree: layout.to_layout(tree, wanted, unit_size(cfg.model.moe_every))
    with jax.set_mesh(mesh):
      params, model_state = jax.jit(convert, out_shardings=shardings)((params, model_state))
  return RestoredModel(
    graphdef=graphdef,
    params=params,
    model_state=model_state,
    step=int(out["step"]),
    cfg=cfg,
    mesh=mesh,
    rules=rules,
  )
