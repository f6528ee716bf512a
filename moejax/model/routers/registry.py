"""Router families by name: `@register("name")` on a `base.Router` subclass makes it selectable.

The config's `model.moe.router` picks a family (or one of its aliases); the family's options are
the config section `model.moe.<family>` built from its `Options` dataclass, so a new router is one
file: routing function, options, registration. A router defined outside moejax is registered by
importing its module before the config is built (a config file imports it; runs record it in
the config's `extensions` so evaluation and generation import it again).
"""

from __future__ import annotations

import dataclasses

from moejax import errors
from moejax.model.routers import base

_FAMILIES: dict[str, type[base.Router]] = {}  # family name -> class
_NAMES: dict[str, str] = {}  # every accepted name (families and aliases) -> family name


def register(name: str, *, aliases: tuple[str, ...] = ()):
  """Class decorator: registers a `base.Router` subclass as family `name` (plus aliases)."""

  def decorate(cls: type[base.Router]) -> type[base.Router]:
    if not (isinstance(cls, type) and issubclass(cls, base.Router)):
      raise TypeError(f"@register({name!r}) needs a subclass of base.Router, got {cls!r}")
    if not dataclasses.is_dataclass(cls.Options):
      raise TypeError(f"router {name!r}: Options must be a dataclass")
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    declared = [f.name for f in dataclasses.fields(cls.Options) if "valid" in f.metadata]
    if declared and not issubclass(cls.Options, base.RouterOptions):
      raise TypeError(
        f"router {name!r}: Options declares {declared} with base.option but is "
        "not a base.RouterOptions subclass (nothing would check them)"
      )
    weights = [f"{loss}_weight" for loss in cls.AUX_LOSSES]
    if cls.CONSISTENCY_PASSES > 1:
      weights.append("consistency_loss_weight")
    missing = [w for w in weights if w not in fields]
    if missing:
      raise TypeError(f"router {name!r}: Options lacks the loss weights {missing}")
    for n in (name, *aliases):
      if _NAMES.get(n, name) != name:
        raise ValueError(f"router name {n!r} is already registered for {_NAMES[n]!r}")
    cls.NAME = name
    _FAMILIES[name] = cls
    _NAMES.update({n: name for n in (name, *aliases)})
    return cls

  return decorate


def names() -> tuple[str, ...]:
  """Every accepted router name (families and aliases), sorted."""
  return tuple(sorted(_NAMES))


def families() -> dict[str, type[base.Router]]:
  """Family name -> router class."""
  return dict(_FAMILIES)


def family(name: str) -> str:
  """The family of a router name (a family name or an alias)."""
  if name not in _NAMES:
    raise errors.ConfigError(f"model.moe.router={name!r} is not one of: {', '.join(names())}")
  return _NAMES[name]


def get(name: str) -> type[base.Router]:
  """The router class registered under `name` (a family name or an alias)."""
  return _FAMILIES[family(name)]


def option_defaults() -> dict[str, dict]:
  """{family: {option: default}}: the `model.moe.<family>` sections of the default config."""
  return {name: dataclasses.asdict(cls.Options()) for name, cls in _FAMILIES.items()}


def settings(moe_cfg) -> base.MoESettings:
  """The `model.moe` values every router may read."""
  return base.MoESettings(
    num_experts=moe_cfg.num_experts,
    top_k=moe_cfg.top_k,
    group_size=moe_cfg.group_size,
    group_layout=moe_cfg.group_layout,
    dispatch=moe_cfg.dispatch,
    capacity_factor=moe_cfg.capacity_factor,
    eval_capacity_factor=moe_cfg.eval_capacity_factor,
    eval_dispatch=moe_cfg.eval_dispatch,
    exchange_factor=moe_cfg.exchange_factor,
    d_expert=moe_cfg.d_expert,
  )


def options(moe_cfg):
  """The selected family's `Options`, built from `model.moe.<family>` and checked.

  Raises:
    errors.ConfigError: an unknown router, or an option value the family refuses.
  """
  name = family(moe_cfg.router)
  cls = _FAMILIES[name]
  section = moe_cfg.get(name)
  values = {} if section is None else dict(section)
  try:
    opts = cls.Options(**values)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"model.moe.{name}.{e}") from None
  cls.check(opts, settings(moe_cfg))
  return opts


def build(moe_cfg, *, d_model: int, rngs) -> base.Router:
  """The router module of the config's family (options checked)."""
  cls = get(moe_cfg.router)
  return cls(d_model=d_model, moe=settings(moe_cfg), options=options(moe_cfg), rngs=rngs)


def loss_weights(moe_cfg) -> dict[str, float]:
  """{aux loss: weight} of the selected family, from its `<loss>_weight` options."""
  return get(moe_cfg.router).loss_weights(options(moe_cfg))


def consistency(moe_cfg) -> tuple[int, float]:
  """(forward passes per training step, weight of their symmetric KL): (1, 0.0) for most."""
  cls = get(moe_cfg.router)
  if cls.CONSISTENCY_PASSES == 1:
    return 1, 0.0
  return cls.CONSISTENCY_PASSES, float(options(moe_cfg).consistency_loss_weight)
