"""The config's `mesh` section: logical-axis rules, the resolved mesh shape, and the checks of the
mesh against the model and the batch (called by `config_lib.validate`, before any compilation).
"""

from __future__ import annotations

import math

from absl import logging

from moejax import sharding
from moejax.errors import ConfigError


def rules_from_config(mesh_cfg) -> sharding.Rules:
  return sharding.Rules.of(
    {k: tuple(a for a in v.split(",") if a) for k, v in mesh_cfg.rules.items()}
  )


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 axis filled with the remaining devices."""
  shape = {a: int(mesh_cfg[a]) for a in sharding.MESH_AXES}
  fill = [a for a, n in shape.items() if n == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {fill}; set the others to sizes")
  for a, n in shape.items():
    if n == 0 or n < -1:
      raise ConfigError(f"mesh.{a}={n}: must be a positive size or -1 (= the remaining devices)")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh: the fixed axes {shape} use {fixed} devices, which does not divide the "
        f"{num_devices} available; choose sizes whose product divides {num_devices}"
      )
    shape[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
      f"mesh {shape} needs {fixed} devices but {num_devices} are available; "
      f"make the product {num_devices} or set one axis to -1"
    )
  return shape


def validate_mesh(cfg, num_devices: int) -> dict[str, int]:
  """The mesh section against the model and batch; returns the resolved mesh shape."""
  moe, t = cfg.model.moe, cfg.train
  rules = rules_from_config(cfg.mesh)
  for name, axes in rules.table:
    bad = [a for a in axes if a not in sharding.MESH_AXES]
    if bad:
      raise ConfigError(
        f"mesh.rules.{name}={cfg.mesh.rules[name]!r}: unknown mesh axes {bad}; "
        f"use a comma-separated subset of {sharding.MESH_AXES}"
      )
  shape = resolve_mesh_shape(cfg.mesh, num_devices)
  if cfg.model.moe_every and moe.num_experts % shape["expert"]:
    raise ConfigError(
      f"model.moe.num_experts={moe.num_experts} is not divisible by mesh.expert="
      f"{shape['expert']}; use a multiple of {shape['expert']} experts or a smaller expert axis"
    )
  batch_shards = math.prod(shape[a] for a in rules["batch"])
  if t.batch_size % batch_shards:
    raise ConfigError(
      f"train.batch_size={t.batch_size} is not divisible by the {batch_shards} devices the batch"
      f" is split over (mesh axes {rules['batch']} of {shape}); use a multiple of {batch_shards}"
    )
  if (t.batch_size // batch_shards) % t.microbatches:
    raise ConfigError(
      f"train.microbatches={t.microbatches} must divide the {t.batch_size // batch_shards} rows "
      f"each of the {batch_shards} batch devices holds (every microbatch spans every device); "
      "use a bigger train.batch_size or fewer microbatches"
    )
  heads = math.prod(shape[a] for a in rules["heads"])
  kv_heads = cfg.model.num_kv_heads or cfg.model.num_heads
  if kv_heads % heads:
    raise ConfigError(
      f"model.num_kv_heads={kv_heads} is not divisible by the {heads} devices the heads are split"
      f" over (mesh axes {rules['heads']} of {shape}); use fewer devices on them"
    )
  if cfg.model.moe_every:
    _validate_groups(cfg, shape, rules)
  return shape


def _validate_groups(cfg, shape, rules) -> None:
  """Routing groups live where they are routed: whole groups per device, and the exchange of
  the dispatch buffers (`group` -> `expert_group` x `act_expert`) is one all-to-all only when the
  expert axes are the minor part of the group axes."""
  moe, t = cfg.model.moe, cfg.train
  expert = tuple(a for a in rules["act_expert"] if shape[a] > 1)
  group = tuple(a for a in rules["group"] if shape[a] > 1)
  outer = tuple(a for a in rules["expert_group"] if shape[a] > 1)
  if expert and (group[len(group) - len(expert) :] != expert or group[: -len(expert)] != outer):
    raise ConfigError(
      f"mesh.rules: group={rules['group']} must be expert_group={rules['expert_group']} followed "
      f"by act_expert={rules['act_expert']} (the expert axes last) for the expert-parallel "
      "exchange; fix mesh.rules.group / expert_group / act_expert"
    )
  shards = math.prod(shape[a] for a in group)
  groups = t.batch_size // t.microbatches * t.seq_len // moe.group_size  # per microbatch
  if groups % shards:
    padded = groups + -groups % shards
    logging.warning(
      "the %d routing groups per microbatch (train.batch_size / train.microbatches * train.seq_len"
      " / model.moe.group_size)"
      " do not split evenly over the %d devices of the group axes %s: the MoE layers pad them to"
      " %d (%.0f%% of their work idle); a smaller model.moe.group_size or a bigger"
      " train.batch_size avoids it",
      groups,
      shards,
      group,
      padded,
      100 * (padded - groups) / padded,
    )
