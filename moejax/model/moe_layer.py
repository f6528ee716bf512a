"""The MoE block: router -> dispatch -> expert bank -> combine.

Tokens are split into routing groups of `group_size` tokens, fixed by config, never by the number
of devices, so the model function is the same on any mesh. Two layouts:
- "sequence": consecutive tokens of the flattened [batch * length] stream;
- "position": tokens at the same position of different sequences (the group never holds a
  sequence's future, so even routers that mix tokens, such as expert choice, stay causal).
The router returns a `Routing` (moejax/model/routers/base.py). Sparse routings go through a
dispatch implementation from `DISPATCHES` with the capacity the router asks for
(`router.capacity(S, capacity_factor)`); soft routings through `ops/soft.py`. Dropped tokens get
zero output, so the block's residual carries them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model import wide
from moejax.model.experts import ExpertBank
from moejax.model.routers import base
from moejax.ops import all_to_all, capacity, dropless, soft

# Dispatch implementations of sparse routing, by `model.moe.dispatch`.
DISPATCHES = {
  "capacity": capacity.capacity_moe,
  "dropless": dropless.dropless_moe,
  "all_to_all": all_to_all.all_to_all_moe,
}
GROUP_LAYOUTS = ("sequence", "position")


class MoELayer(nnx.Module):
  def __init__(self, *, router: nnx.Module, experts: ExpertBank, num_experts: int, top_k: int,
               dispatch: str, capacity_factor: float, eval_capacity_factor: float,
               group_size: int, group_layout: str = "sequence",
               shared_experts: nnx.Module | None = None):  # fmt: skip
    if dispatch not in DISPATCHES:
      raise ValueError(f"unknown dispatch {dispatch!r}; known: {sorted(DISPATCHES)}")
    self.router = router
    self.experts = experts
    self.num_experts = num_experts
    self.top_k = top_k
    self.dispatch = dispatch
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.group_size = group_size
    if group_layout not in GROUP_LAYOUTS:
      raise ValueError(f"unknown group_layout {group_layout!r}; known: {GROUP_LAYOUTS}")
    self.group_layout = group_layout
    self.shared_experts = shared_experts  # a dense MLP every token uses (DeepSeekMoE)

  def __call__(self, x_bld, *, train: bool, rng: jax.Array | None, return_hidden: bool = False):
    """Returns (y [batch, length, d_model], aux_losses {name: scalar}, metrics {name: array}),
    plus z_hat [batch, length, E * d_expert] (moejax/model/wide.py) when `return_hidden`."""
    x_gsd = self._to_groups(x_bld)
    s = x_gsd.shape[1]
    # Routers that score experts by their weights (moex) read the expert bank.
    uses_experts = getattr(self.router, "USES_EXPERT_WEIGHTS", False)
    extra = {"experts": self.experts} if uses_experts else {}
    routing = self.router(x_gsd, train=train, rng=rng, **extra)
    if isinstance(routing, base.SoftRouting):
      y_gsd, dispatch_metrics = soft.soft_moe(
        x_gsd, routing, self.experts, num_experts=self.num_experts
      )
    else:
      cf = self.capacity_factor if train else self.eval_capacity_factor
      y_gsd, dispatch_metrics = DISPATCHES[self.dispatch](
          x_gsd, routing, self.experts, num_experts=self.num_experts,
          capacity=self.router.capacity(s, cf),
      )  # fmt: skip
    y = self._from_groups(y_gsd, x_bld.shape)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x_bld)
    if return_hidden:
      z_gsk = wide.moe_hidden_code(self, x_gsd, routing, train=train)
      z_blk = self._from_groups(z_gsk, (*x_bld.shape[:2], z_gsk.shape[-1]))
      return y, routing.aux_losses, {**routing.metrics, **dispatch_metrics}, z_blk
    return y, routing.aux_losses, {**routing.metrics, **dispatch_metrics}

  def _to_groups(self, x_bld):
    """[B, L, D] -> [G, S, D] in the configured group layout."""
    batch, length, d = x_bld.shape
    s = self.group_size
    if self.group_layout == "position":
      if batch % s:
        raise ValueError(f"group_layout 'position' needs group_size={s} to divide batch={batch}")
      x_bld = jnp.swapaxes(x_bld, 0, 1)  # [L, B, D]: a group = one position of S sequences
    elif (batch * length) % s:
      raise ValueError(f"group_size={s} must divide batch*length={batch * length}")
    return sharding.constrain(x_bld.reshape(-1, s, d), ("group", None, "act_embed"))

  def _from_groups(self, y_gsd, shape_bld):
    batch, length, d = shape_bld
    if self.group_layout == "position":
      y = jnp.swapaxes(y_gsd.reshape(length, batch, d), 0, 1)
    else:
      y = y_gsd.reshape(batch, length, d)
    return sharding.constrain(y, ("batch", "length", "act_embed"))
