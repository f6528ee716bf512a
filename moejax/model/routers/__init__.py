"""Routers by name: the config's `model.moe.router` picks a class from this registry.

Every router class:
- takes keyword arguments d_model, num_experts, top_k, rngs, plus the options of its family,
  declared as `CONFIG_OPTIONS = {kwarg: "model.moe key"}` (so routers never read the config);
- has `capacity(num_tokens, capacity_factor) -> int` (slots per expert per group) when it
  returns a SparseRouting;
- has `causal_in_sequence(top_k, **options) -> bool` (classmethod): whether a token's output is
  independent of later tokens of its routing group. Routers that are not causal are refused in a
  decoder with model.moe.group_layout='sequence' unless model.moe.allow_noncausal is set.
A new router family = a new file here + one registry line.
"""

from __future__ import annotations

import importlib

# name -> (module in this package, class). Modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str]] = {
  "top_k": ("top_k", "TopKRouter"),
  "switch": ("top_k", "TopKRouter"),
  "gshard_top2": ("gshard_top2", "GShardTop2Router"),
  "noisy_top_k": ("noisy_top_k", "NoisyTopKRouter"),
  "noisy_topk": ("noisy_top_k", "NoisyTopKRouter"),  # alias: the recipe's spelling
  "expert_choice": ("expert_choice", "ExpertChoiceRouter"),
  "soft_moe": ("soft_moe", "SoftMoERouter"),
  "deepseek": ("deepseek", "DeepSeekRouter"),
  "base": ("base_layers", "BaseLayersRouter"),
  "moex": ("moex", "MoEXRouter"),
}
ROUTERS = tuple(sorted(_REGISTRY))

# Unweighted aux losses routers may return; config `model.moe.aux_loss_weights` weights them.
AUX_LOSSES = (
  "load_balance_loss",  # Switch / GShard / ST-MoE
  "router_z_loss",  # ST-MoE
  "importance_loss",  # noisy top-k (CV^2 of importance)
  "load_loss",  # noisy top-k (CV^2 of smooth load)
  "sequence_balance_loss",  # DeepSeek-V3 sequence-wise balance
)


def get_router_class(name: str) -> type:
  """The router class registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown router {name!r}; known routers: {', '.join(ROUTERS)}")
  module_name, class_name = _REGISTRY[name]
  module = importlib.import_module(f"{__name__}.{module_name}")
  return getattr(module, class_name)


def router_options(name: str, moe_cfg) -> dict:
  """The family-specific keyword arguments of router `name`, read from the `model.moe` config."""
  cls = get_router_class(name)
  return {kwarg: moe_cfg[key] for kwarg, key in getattr(cls, "CONFIG_OPTIONS", {}).items()}
