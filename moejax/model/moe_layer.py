"""The MoE block: router -> dispatch -> expert bank -> combine.

Tokens are split into routing groups of `group_size` consecutive tokens (fixed by config, never by
the number of devices, so the model function is the same on any mesh). The router returns a
`Routing` (moejax/model/routers/base.py); a dispatch implementation from `DISPATCHES` moves tokens
to experts and back. Dropped tokens get zero output, so the block's residual carries them.
"""

from __future__ import annotations

import jax
from flax import nnx

from moejax import sharding
from moejax.model.experts import ExpertBank
from moejax.ops import capacity

DISPATCHES = {"capacity": capacity.capacity_moe}


class MoELayer(nnx.Module):
  def __init__(self, *, router: nnx.Module, experts: ExpertBank, num_experts: int, top_k: int,
               dispatch: str, capacity_factor: float, eval_capacity_factor: float,
               group_size: int):  # fmt: skip
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

  def __call__(self, x_bld, *, train: bool, rng: jax.Array | None):
    """Returns (y [batch, length, d_model], aux_losses {name: scalar}, metrics {name: array})."""
    batch, length, d = x_bld.shape
    s = self.group_size
    if (batch * length) % s:
      raise ValueError(f"group_size={s} must divide batch*length={batch * length}")
    x_gsd = sharding.constrain(
      x_bld.reshape(batch * length // s, s, d), ("group", None, "act_embed")
    )
    routing = self.router(x_gsd, train=train, rng=rng)
    cf = self.capacity_factor if train else self.eval_capacity_factor
    cap = capacity.token_choice_capacity(s, self.num_experts, self.top_k, cf)
    y_gsd, dispatch_metrics = DISPATCHES[self.dispatch](
      x_gsd, routing, self.experts, num_experts=self.num_experts, capacity=cap
    )
    y = sharding.constrain(y_gsd.reshape(batch, length, d), ("batch", "length", "act_embed"))
    return y, routing.aux_losses, {**routing.metrics, **dispatch_metrics}
