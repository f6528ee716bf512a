"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a dense checkpoint.

`--config.init.from_dense=DIR` (a dense run's workdir, its checkpoints/ or checkpoints/<step>)
initialises a fresh MoE run as follows:
- every expert of an MoE layer starts as a copy of that layer's dense MLP (`w_in`, `w_gate`,
  `w_out`), optionally perturbed by N(0, (noise * std(w))^2) with `init.from_dense_noise`;
- the router (and DeepSeek's shared experts and balance bias) keep their fresh initialisation;
- every other parameter (embeddings, attention, norms, dense layers, unembedding) is copied;
- the optimizer starts fresh (AdamW moments are zeros whatever the parameters) at step 0.
With top-1 routing whose combine weight is renormalised to 1 (`normalize_top_k`), no router noise
and no capacity dropping, the MoE model computes exactly the dense model's function at step 0
(tests/test_upcycle.py).

Design choices:
- The parameter plan is checked against the dense checkpoint's metadata (shapes only, no array
  read) before any data is loaded or anything compiled; one `UpcycleError` names EVERY
  mismatched, missing or unused parameter, so a user fixes the config in one go.
- The dense run's tokenizer is copied into the new workdir: the embeddings only mean something
  with the token ids they were trained on.
- Arrays are restored straight onto the MoE run's mesh: a copied parameter with its MoE sharding,
  a dense MLP with the sharding of its expert copies minus the expert axis.
- A workdir that already holds a checkpoint resumes from it; `from_dense` is then ignored.
- Either model may be scanned (`model.scan_layers`): the plan is made on per-layer names
  (`blocks.{i}...`), the dense arrays are read in their saved layout and the MoE parameters are
  restacked at the end (moejax/model/layout.py).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import errors, paths, restore
from moejax.model import layout, routers
from moejax.model.blocks import unit_size

_EXPERT = re.compile(r"^(blocks\.\d+\.ffn)\.experts\.(w_in|w_gate|w_out)$")
_FRESH = re.compile(r"^blocks\.\d+\.ffn\.(router|shared_experts)\.")


class UpcycleError(errors.ConfigError):
  """The dense checkpoint does not fit the MoE config; the message lists every parameter."""


def dotted(path) -> str:
  """A jax key path -> 'blocks.1.ffn.w_in'."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def plan_upcycling(moe_shapes: dict[str, tuple], dense_shapes: dict[str, tuple]) -> dict:
  """Where each MoE parameter comes from.

  Args:
    moe_shapes: {dotted name: shape} of the MoE model's parameters.
    dense_shapes: {dotted name: shape} of the dense checkpoint's parameters.

  Returns:
    {moe name: ("copy", dense name) | ("experts", dense name) | ("fresh", None)}.

  Raises:
    UpcycleError: listing every parameter whose shape does not match, that the checkpoint lacks,
      or that the checkpoint has and the MoE model would not use.
  """
  plan, problems, used = {}, [], set()
  for name, shape in sorted(moe_shapes.items()):
    expert = _EXPERT.match(name)
    if _FRESH.match(name):
      plan[name] = ("fresh", None)
    elif expert:
      source = f"{expert.group(1)}.{expert.group(2)}"
      used.add(source)
      if source not in dense_shapes:
        problems.append(f"{name} {list(shape)}: the checkpoint has no dense MLP weight {source}")
      elif tuple(dense_shapes[source]) != tuple(shape[1:]):
        problems.append(
          f"{name} {list(shape)}: each expert needs {source} of shape {list(shape[1:])}, the "
          f"checkpoint's is {list(dense_shapes[source])}"
        )
      plan[name] = ("experts", source)
    elif name in dense_shapes:
      used.add(name)
      if tuple(dense_shapes[name]) != tuple(shape):
        problems.append(
          f"{name}: the MoE model's shape is {list(shape)}, the checkpoint's "
          f"{list(dense_shapes[name])}"
        )
      plan[name] = ("copy", name)
    else:
      problems.append(f"{name} {list(shape)}: not in the checkpoint")
  for name in sorted(set(dense_shapes) - used):
    problems.append(
      f"{name} {list(dense_shapes[name])}: in the checkpoint, unused by the MoE model"
    )
  if problems:
    raise UpcycleError(
      f"init.from_dense: {len(problems)} parameter(s) do not match: "
      + "; ".join(problems)
      + ". Give the MoE config the dense run's sizes (num_layers, d_model, num_heads, head_dim, "
      "vocab_size, activation; moe.d_expert = the dense d_ff) and a dense checkpoint "
      "(configs/dense.py)"
    )
  return plan


@dataclasses.dataclass
class Upcycling:
  """A checked plan: restore `dense_target` from `directory` at `step`, then apply `plan`."""

  directory: object  # epath.Path of the dense run's checkpoints
  step: int
  plan: dict
  dense_target: dict  # nested like the checkpoint's params, ShapeDtypeStruct leaves
  noise: float
  seed: int
  unit: int  # layers per scan unit of the MoE model (to restack scanned parameters)


def prepare(cfg, workdir, abs_params: dict, param_shardings: dict) -> Upcycling | None:
  """Checks `cfg.init.from_dense` against the MoE model and copies the dense tokenizer.

  Args:
    cfg: the MoE run's config.
    workdir: the MoE run's workdir.
    abs_params: pure dict of the MoE model's abstract parameters.
    param_shardings: matching pure dict of their NamedShardings on the run's mesh.

  Returns:
    None when `workdir` already holds a checkpoint (the run resumes), else the checked plan.
  """
  if cfg.model.moe_every:
    router = routers.get(cfg.model.moe.router)
    refusal = router.upcycle_refusal(routers.options(cfg.model.moe), cfg.init.from_dense_noise)
    if refusal:
      raise UpcycleError(
        f"init.from_dense with model.moe.router={cfg.model.moe.router!r}: {refusal}"
      )
  checkpoints = paths.resolve(workdir) / "checkpoints"
  if checkpoints.is_dir():
    manager = restore.open_checkpoints(checkpoints)
    resuming = bool(manager.all_steps())
    manager.close()
    if resuming:
      return None
  directory, step = restore.checkpoint_location(cfg.init.from_dense)
  manager = restore.open_checkpoints(directory)
  step = restore.pick_step(manager, step, directory)
  meta = manager.item_metadata(step)["state"].tree["params"]
  manager.close()
  meta = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), meta)
  dense_layout = layout.layout_of(meta)
  dense_shapes = {
    n: tuple(x.shape) for n, x in restore.flatten(layout.to_layout(meta, layout.PER_LAYER)).items()
  }
  # Shapes carry their shardings through the restacking (a sharding alone has no layer count).
  sharded = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_params, param_shardings
  )
  flat = jax.tree_util.tree_flatten_with_path(layout.to_layout(sharded, layout.PER_LAYER))[0]
  moe = {dotted(p): x for p, x in flat}
  shard = {name: x.sharding for name, x in moe.items()}
  plan = plan_upcycling({n: x.shape for n, x in moe.items()}, dense_shapes)

  # Each dense array lands on the sharding of what it becomes.
  target_sharding = {}
  for name, (kind, source) in plan.items():
    if kind == "copy":
      target_sharding[source] = shard[name]
    elif kind == "experts":
      target_sharding[source] = NamedSharding(shard[name].mesh, P(*shard[name].spec[1:]))

  def to_target(path, leaf):
    name = dotted(path)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target_sharding[name])

  dense_target = jax.tree_util.tree_map_with_path(
    to_target, layout.to_layout(meta, layout.PER_LAYER)
  )
  if dense_layout == layout.STACKED:  # read as saved: a dense model's unit is one layer
    dense_target = layout.to_layout(dense_target, layout.STACKED, unit=1)
  _copy_tokenizer(directory.parent, paths.resolve(workdir))
  return Upcycling(
    directory,
    step,
    plan,
    dense_target,
    cfg.init.from_dense_noise,
    cfg.train.seed,
    unit_size(cfg.model.moe_every),
  )


def _copy_tokenizer(dense_workdir, workdir) -> None:
  """Copies the dense run's tokenizer file, if it has one (fixed vocabularies have none)."""
  source, target = dense_workdir / "tokenizer.model", workdir / "tokenizer.model"
  if not source.exists():
    return
  if not target.exists():
    workdir.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(target, source.read_bytes())
  elif source.read_bytes() != target.read_bytes():
    raise UpcycleError(
      f"init.from_dense: {str(target)!r} differs from the dense run's tokenizer {str(source)!r}; "
      "use a new workdir (the embeddings need the dense run's token ids)"
    )


def upcycle_params(fresh_params, dense_flat: dict, plan: dict, *, noise: float, key):
  """The MoE parameters: copies and expert copies of the dense ones, fresh where planned.

  Args:
    fresh_params: pure dict of the freshly initialised MoE parameters.
    dense_flat: {dotted name: array} of the dense checkpoint's parameters.
    plan: from `plan_upcycling`.
    noise: relative std of the noise added to each expert copy (0 = exact copies).
    key: PRNG key for the noise.
  """
  names = sorted(plan)

  def build(path, fresh):
    name = dotted(path)
    kind, source = plan[name]
    if kind == "fresh":
      return fresh
    dense = dense_flat[source].astype(fresh.dtype)
    if kind == "copy":
      return dense
    copies = jnp.broadcast_to(dense, fresh.shape)  # [E, ...]: expert e = the dense MLP
    if noise > 0:
      eps = jax.random.normal(jax.random.fold_in(key, names.index(name)), fresh.shape, fresh.dtype)
      copies = copies + noise * jnp.std(dense) * eps
    return copies

  return jax.tree_util.tree_map_with_path(build, fresh_params)


def init_state(up: Upcycling, init_fn, state_shardings):
  """The MoE train state at step 0 with upcycled parameters, on the run's shardings.

  Args:
    up: from `prepare`.
    init_fn: `() -> train state` of the fresh MoE model (moejax.train's `init_state`).
    state_shardings: the train state's shardings.
  """
  manager = restore.open_checkpoints(up.directory)
  restore_args = ocp.checkpoint_utils.construct_restore_args(up.dense_target)
  dense = manager.restore(
    up.step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item={"params": up.dense_target},
        restore_args={"params": restore_args},
        partial_restore=True,
      )
    ),
  )["state"]["params"]
  manager.close()

  def build(dense):
    dense_flat = restore.flatten(layout.to_layout(dense, layout.PER_LAYER))
    state = init_fn()
    key = jax.random.key(up.seed + 1)
    fresh = state["params"]
    params = upcycle_params(
      layout.to_layout(fresh, layout.PER_LAYER), dense_flat, up.plan, noise=up.noise, key=key
    )
    if layout.layout_of(fresh) == layout.STACKED:
      params = layout.to_layout(params, layout.STACKED, up.unit)
    return {**state, "params": params}

  return jax.jit(build, out_shardings=state_shardings)(dense)
