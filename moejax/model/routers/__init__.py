"""Routers by name: the config's `moe.router` picks a class from `ROUTERS`.

Every router class takes keyword arguments d_model, num_experts, top_k, rngs, plus the options
of its family. A new router family = a new file here + one registry line.
"""

from __future__ import annotations

from moejax.model.routers import top_k

ROUTERS: dict[str, type] = {
  "top_k": top_k.TopKRouter,
  "switch": top_k.TopKRouter,
}


def get_router_class(name: str) -> type:
  """The router class registered under `name`."""
  if name not in ROUTERS:
    raise ValueError(f"unknown router {name!r}; known routers: {', '.join(sorted(ROUTERS))}")
  return ROUTERS[name]


# Unweighted aux losses routers may return; config `model.moe.aux_loss_weights` weights them.
AUX_LOSSES = ("load_balance_loss", "router_z_loss")


def router_options(name: str, moe_cfg) -> dict:
  """The family-specific keyword arguments of router `name`, read from the `model.moe` config.

  Kept here (not in the routers) so router modules never read the config object.
  """
  cls = get_router_class(name)
  if cls is top_k.TopKRouter:
    return {
      "jitter_eps": moe_cfg.jitter_eps,
      "normalize_weights": moe_cfg.normalize_top_k,
      "init_std": moe_cfg.router_init_std,
    }
  return {}
