"""The expert bank: E feed-forward networks as stacked weights, applied to dispatch buffers.

Einsum letters: g groups, e experts, c capacity slots, d d_model, f expert hidden.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.layers import activation_fn, param

_W_AXES = ("expert", "expert_embed", "expert_mlp")
_BUF_AXES = ("group", "act_expert", "capacity")


class ExpertBank(nnx.Module):
  """Weights w_in/w_gate [E, D, F] and w_out [E, F, D], sharded on the 'expert' logical axis."""

  def __init__(self, num_experts: int, d_model: int, d_expert: int, *, activation: str,
               init_std: float, out_std: float, rngs: nnx.Rngs):  # fmt: skip
    self.activation = activation
    self.w_in = param(rngs, (num_experts, d_model, d_expert), _W_AXES, init_std)
    self.w_gate = (
      param(rngs, (num_experts, d_model, d_expert), _W_AXES, init_std)
      if activation == "swiglu"
      else None
    )
    out_axes = ("expert", "expert_mlp", "expert_embed")
    self.w_out = param(rngs, (num_experts, d_expert, d_model), out_axes, out_std)

  def weights(self) -> dict:
    """The stacked arrays and the activation function, for grouped-matmul dispatches."""
    return {
      "w_in": self.w_in[...],
      "w_gate": None if self.w_gate is None else self.w_gate[...],
      "w_out": self.w_out[...],
      "activation": activation_fn(self.activation),
    }

  def hidden(self, buf_gecd):
    """Post-activation expert hidden code [G, E, C, F]."""
    dtype = buf_gecd.dtype
    h = jnp.einsum("gecd,edf->gecf", buf_gecd, self.w_in[...].astype(dtype))
    h = activation_fn(self.activation)(h)
    if self.w_gate is not None:
      h = h * jnp.einsum("gecd,edf->gecf", buf_gecd, self.w_gate[...].astype(dtype))
    return sharding.constrain(h, (*_BUF_AXES, "act_mlp"))

  def __call__(self, buf_gecd):
    """[G, E, C, D] token buffers -> [G, E, C, D] expert outputs (expert e on buffer e)."""
    out = jnp.einsum(
      "gecf,efd->gecd", self.hidden(buf_gecd), self.w_out[...].astype(buf_gecd.dtype)
    )
    return sharding.constrain(out, (*_BUF_AXES, "act_embed"))
