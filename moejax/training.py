"""The training program of a config on a mesh: abstract model and state, shardings, jitted steps.

`program_for(cfg, devices)` validates the config, makes the mesh and builds everything the train
step needs from abstract shapes (nothing allocated). Shared by `moejax.train` (which runs it), the
dry run and `benchmarks/collectives.py` (which compile the same jitted step), so they measure
exactly the program a run executes:

  program = program_for(cfg, jax.devices())
  compiled = program.lower().compile()   # compiled.as_text(), memory_analysis(), cost_analysis()

Also: reading a checkpoint saved in the other parameter layout (scanned <-> per-layer) on resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import checkpoint, config_lib, optim, restore, sharding, train_step
from moejax import mesh as mesh_lib
from moejax.model import layout, routers
from moejax.model.blocks import unit_size
from moejax.model.transformer import Transformer


@dataclasses.dataclass
class Program:
  """Everything about a run's step that is known before any array exists.

  Attributes:
    mesh, mesh_shape, rules: where the program runs.
    graphdef: the model's graph definition (static part of every step).
    abs_params: abstract parameters (nnx.State) with their logical axes.
    param_shardings: pure dict of NamedShardings of the parameters.
    init_state: `() -> train state` (jit it with `out_shardings=state_shardings`).
    abs_state: the train state as ShapeDtypeStructs carrying their shardings.
    state_shardings: the train state's NamedShardings.
    batch_sharding: sharding of the [batch, length] token arrays.
    step_fn: the jitted train step `(state, batch) -> (state, metrics)` (state donated).
    eval_fn: the jitted `(state, batch) -> (summed NLL, token count)`.
    num_params: number of parameters.
  """

  mesh: jax.sharding.Mesh
  mesh_shape: dict[str, int]
  rules: sharding.Rules
  graphdef: nnx.GraphDef
  abs_params: nnx.State
  param_shardings: dict
  init_state: Callable
  abs_state: dict
  state_shardings: dict
  batch_sharding: NamedSharding
  step_fn: Callable
  eval_fn: Callable
  num_params: int
  batch_shape: tuple[int, int]

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of one global batch {"inputs", "targets"} (int32 [batch, length])."""
    token = jax.ShapeDtypeStruct(self.batch_shape, "int32", sharding=self.batch_sharding)
    return {"inputs": token, "targets": token}

  def lower(self):
    """The train step lowered for abstract state and batch (compile it for XLA's analyses)."""
    with jax.set_mesh(self.mesh):
      return self.step_fn.lower(self.abs_state, self.abstract_batch())


def program_for(cfg, devices) -> Program:
  """The program of `cfg` on a mesh over `devices`; the config is validated first (ConfigError)."""
  devices = list(devices)
  config_lib.import_extensions(cfg.extensions)
  mesh_shape = config_lib.validate(cfg, len(devices))
  rules = config_lib.rules_from_config(cfg.mesh)
  mesh = mesh_lib.make_mesh(mesh_shape, devices, dcn=cfg.mesh.dcn, batch_axes=rules["batch"])
  return build(cfg, mesh, mesh_shape, rules)


def build(cfg, mesh, mesh_shape: dict[str, int], rules: sharding.Rules) -> Program:
  """Builds the abstract model and optimizer, their shardings and the jitted steps (no arrays)."""
  t = cfg.train
  graphdef, abs_params, abs_rest, init_state, optimizer = _model_and_state(cfg, rules)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
  rest_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_rest, mesh, rules))
  abs_state = jax.eval_shape(init_state)
  state_shardings = _state_shardings(abs_state, param_shardings, rest_shardings, optimizer, mesh)
  abs_state = checkpoint.abstract_like(abs_state, state_shardings)
  batch_sharding = NamedSharding(mesh, rules.spec(("batch", "length")))
  step = train_step.make_train_step(
    graphdef,
    optimizer,
    routers.loss_weights(cfg.model.moe),
    optim.learning_rate_schedule(cfg.optim, t.steps),
    nonfinite_policy=t.nonfinite_policy,
    poison_step=t.debug_poison_step,
    consistency=routers.consistency(cfg.model.moe),
    loss_chunk=t.loss_chunk,
    microbatches=t.microbatches,
    batch_shards=math.prod(mesh_shape[a] for a in rules["batch"]),
  )
  step_fn = jax.jit(
    step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )
  eval_step = train_step.make_eval_step(graphdef, t.loss_chunk)
  eval_fn = jax.jit(
    lambda state, batch: eval_step(state["params"], state["model_state"], batch)[:2],
    in_shardings=(state_shardings, batch_sharding),
  )
  return Program(
    mesh=mesh,
    mesh_shape=mesh_shape,
    rules=rules,
    graphdef=graphdef,
    abs_params=abs_params,
    param_shardings=param_shardings,
    init_state=init_state,
    abs_state=abs_state,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    step_fn=step_fn,
    eval_fn=eval_fn,
    num_params=sum(x.size for x in jax.tree.leaves(abs_state["params"])),
    batch_shape=(t.batch_size, t.seq_len),
  )


def _model_and_state(cfg, rules):
  t = cfg.train
  make_model = lambda: Transformer(cfg.model, rngs=nnx.Rngs(t.seed), rules=rules)
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
  optimizer = optim.make_optimizer(cfg.optim, t.steps)

  def init_state():
    _, params, rest = nnx.split(make_model(), nnx.Param, ...)
    return train_step.new_train_state(
      nnx.to_pure_dict(params), nnx.to_pure_dict(rest), optimizer, t.seed
    )

  return graphdef, abs_params, abs_rest, init_state, optimizer


def _state_shardings(abs_state, param_shardings, rest_shardings, optimizer, mesh):
  """Shardings of the whole train state: optimizer moments follow their parameters."""
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(
    optimizer,
    lambda _, s: s,
    abs_state["opt_state"],
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
  return {
    "step": replicated,
    "params": param_shardings,
    "model_state": rest_shardings,
    "opt_state": opt,
    "rng": replicated,
  }


# -------------------------------------------------------------------- checkpoints of either layout


def saved_layout(ckpt: checkpoint.Checkpointer) -> str | None:
  """The parameter layout (layout.STACKED / PER_LAYER) of the newest checkpoint, None if none."""
  step = ckpt.latest_step()
  if step is None:
    return None
  try:
    meta = ckpt.manager.item_metadata(step)["state"]
    return layout.layout_of(getattr(meta, "tree", meta)["params"])
  except Exception:  # noqa: BLE001 - unreadable metadata is damage, handled by restore_latest
    return None


def state_as_saved(cfg, program: Program, saved: str | None) -> dict:
  """The abstract train state in the checkpoint's layout `saved` (the program's own if same)."""
  if saved is None or saved == restore.params_layout(cfg.model):
    return program.abs_state
  other = cfg.copy_and_resolve_references()
  other.model.scan_layers = saved == layout.STACKED
  return build(other, program.mesh, program.mesh_shape, program.rules).abs_state


def to_program_layout(cfg, program: Program, state: dict) -> dict:
  """A restored train state (any layout) in the program's layout, on its shardings."""
  wanted = restore.params_layout(cfg.model)
  if layout.layout_of(state["params"]) in (None, wanted):
    return state
  convert = lambda s: layout.to_layout(s, wanted, unit_size(cfg.model.moe_every))
  return jax.jit(convert, out_shardings=program.state_shardings)(state)
