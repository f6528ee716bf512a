"""The train step of a config as a jitted function with abstract inputs: compile without data.

`train_step_spec(cfg, devices)` builds what `moejax.train.run` jits (the same model, optimizer,
shardings and step function) from `jax.ShapeDtypeStruct`s only, so the step can be lowered and
compiled for a mesh of simulated devices without allocating a parameter:

  spec = train_step_spec(cfg, jax.devices())
  compiled = spec.lower().compile()   # compiled.as_text(), memory_analysis(), cost_analysis()

Used by `benchmarks/collectives.py` (collective bytes of the whole step) and the dry run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import config_lib, optim, sharding, train_step
from moejax import mesh as mesh_lib
from moejax.model import routers
from moejax.model.transformer import Transformer


@dataclasses.dataclass
class StepSpec:
  """A jitted train step and abstract arguments carrying their shardings."""

  mesh: jax.sharding.Mesh
  mesh_shape: dict[str, int]
  rules: sharding.Rules
  step: object  # jax.jit(...) of train_step.make_train_step
  abstract_state: dict
  abstract_batch: dict
  num_params: int

  def lower(self):
    with jax.set_mesh(self.mesh):
      return self.step.lower(self.abstract_state, self.abstract_batch)


def state_shardings(abs_state, param_shardings, rest_shardings, optimizer, mesh):
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


def train_step_spec(cfg, devices) -> StepSpec:
  """The train step of `cfg` on a mesh over `devices`, from abstract shapes (validated first)."""
  devices = list(devices)
  config_lib.import_extensions(cfg.extensions)
  mesh_shape = config_lib.validate(cfg, len(devices))
  rules = config_lib.rules_from_config(cfg.mesh)
  mesh = mesh_lib.make_mesh(mesh_shape, devices, dcn=cfg.mesh.dcn, batch_axes=rules["batch"])
  t = cfg.train
  make_model = lambda: Transformer(cfg.model, rngs=nnx.Rngs(t.seed), rules=rules)
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
  rest_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_rest, mesh, rules))
  optimizer = optim.make_optimizer(cfg.optim, t.steps)

  def init_state():
    _, params, rest = nnx.split(make_model(), nnx.Param, ...)
    return train_step.new_train_state(
      nnx.to_pure_dict(params), nnx.to_pure_dict(rest), optimizer, t.seed
    )

  abs_state = jax.eval_shape(init_state)
  shardings = state_shardings(abs_state, param_shardings, rest_shardings, optimizer, mesh)
  abs_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_state, shardings
  )
  batch_sharding = NamedSharding(mesh, rules.spec(("batch", "length")))
  token = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sharding)
  step = jax.jit(
    train_step.make_train_step(
      graphdef,
      optimizer,
      routers.loss_weights(cfg.model.moe),
      optim.learning_rate_schedule(cfg.optim, t.steps),
      nonfinite_policy=t.nonfinite_policy,
      consistency=routers.consistency(cfg.model.moe),
    ),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )
  return StepSpec(
    mesh=mesh,
    mesh_shape=mesh_shape,
    rules=rules,
    step=step,
    abstract_state=abs_state,
    abstract_batch={"inputs": token, "targets": token},
    num_params=sum(x.size for x in jax.tree.leaves(abs_state["params"])),
  )
