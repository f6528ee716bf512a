"""The expert bank: E feed-forward networks as stacked weights, applied to dispatch buffers.

Einsum letters: g groups, e experts, c capacity slots, n = g * c rows of one expert, d d_model,
f expert hidden.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.layers import activation_fn, param

_W_AXES = ("expert", "expert_embed", "expert_mlp")
_BUF_AXES = ("expert_group", "act_expert", "capacity")


class ExpertBank(nnx.Module):
  """Weights w_in/w_gate [E, D, F] and w_out [E, F, D], sharded on the 'expert' logical axis."""

  def __init__(
    self,
    num_experts: int,
    d_model: int,
    d_expert: int,
    *,
    activation: str,
    init_std: float,
    out_std: float,
    rngs: nnx.Rngs,
    rules: sharding.Rules | None = None,
    param_dtype=jnp.float32,
  ):
    """`param_dtype`: the storage dtype of the weights (they are cast to the compute dtype)."""
    self.activation = activation
    self.rules = rules
    in_shape = (num_experts, d_model, d_expert)
    self.w_in = param(rngs, in_shape, _W_AXES, init_std, param_dtype)
    self.w_gate = (
      param(rngs, in_shape, _W_AXES, init_std, param_dtype) if activation == "swiglu" else None
    )
    out_axes = ("expert", "expert_mlp", "expert_embed")
    self.w_out = param(rngs, (num_experts, d_expert, d_model), out_axes, out_std, param_dtype)

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
    g, e, c, _ = buf_gecd.shape
    h_enf = self._hidden_rows(_to_rows(buf_gecd))
    return sharding.constrain(_from_rows(h_enf, g, c), (*_BUF_AXES, "act_mlp"), self.rules)

  def __call__(self, buf_gecd):
    """[G, E, C, D] token buffers -> [G, E, C, D] expert outputs (expert e on buffer e)."""
    g, e, c, _ = buf_gecd.shape
    h_enf = self._hidden_rows(_to_rows(buf_gecd))
    out_end = jnp.einsum("enf,efd->end", h_enf, self.w_out[...].astype(buf_gecd.dtype))
    return sharding.constrain(_from_rows(out_end, g, c), (*_BUF_AXES, "act_embed"), self.rules)

  def _hidden_rows(self, x_end):
    """[E, N, D] rows of each expert -> [E, N, F] post-activation hidden code."""
    dtype = x_end.dtype
    h = jnp.einsum("end,edf->enf", x_end, self.w_in[...].astype(dtype))
    h = activation_fn(self.activation)(h)
    if self.w_gate is not None:
      h = h * jnp.einsum("end,edf->enf", x_end, self.w_gate[...].astype(dtype))
    return sharding.constrain(h, _ROW_AXES, self.rules)


# The experts run on [E, N = G*C, D]: one matmul per expert over the slots of all groups, which
# XLA:CPU runs markedly faster than the [G, E, C, D] einsum, mostly in the backward
# (docs/PERFORMANCE.md).
_ROW_AXES = ("act_expert", "expert_group", "act_mlp")


def _to_rows(buf_gecd):
  g, e, c, d = buf_gecd.shape
  return jnp.swapaxes(buf_gecd, 0, 1).reshape(e, g * c, d)


def _from_rows(x_enk, g, c):
  e, _, k = x_enk.shape
  return jnp.swapaxes(x_enk.reshape(e, g, c, k), 0, 1)
