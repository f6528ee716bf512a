"""Small building blocks shared by the model: parameter init, RMSNorm, rotary embeddings, MLP.

Einsum letters: b batch, l length, d d_model, f hidden (d_ff).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding


def param(rngs: nnx.Rngs, shape, axes, std: float) -> nnx.Param:
  """A float32 normal(std) parameter annotated with logical axes (read by moejax.sharding)."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=tuple(axes))


def activation_fn(name: str):
  """Elementwise activation by name; 'swiglu' uses silu on the gate branch."""
  return {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "swiglu": jax.nn.silu}[name]


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, returned in the input dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("embed",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def apply_rope(x_blhk, theta: float, offset=0):
  """Rotary position embedding on the last axis (pairs of halves), positions offset..offset+L-1.

  Args:
    x_blhk: [batch, length, heads, head_dim] with an even head_dim.
    offset: position of the first token (an int or a traced int32 scalar; KV-cache decoding).
  """
  length, head_dim = x_blhk.shape[1], x_blhk.shape[-1]
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  positions = offset + jnp.arange(length, dtype=jnp.float32)
  angle = positions[:, None] * freq[None, :]  # [L, half]
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_blhk.dtype)


class DenseMLP(nnx.Module):
  """Position-wise feed-forward block: w_out(act(x w_in) [* x w_gate])."""

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    *,
    activation: str,
    init_std: float,
    out_std: float,
    rngs: nnx.Rngs,
    rules: sharding.Rules | None = None,
  ):
    self.activation = activation
    self.rules = rules
    self.w_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std)
    self.w_gate = (
      param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std) if activation == "swiglu" else None
    )
    self.w_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)

  def hidden(self, x_bld):
    """The post-activation hidden code [batch, length, d_ff] (used for interpretability too)."""
    dtype = x_bld.dtype
    h = activation_fn(self.activation)(
      jnp.einsum("bld,df->blf", x_bld, self.w_in[...].astype(dtype))
    )
    if self.w_gate is not None:
      h = h * jnp.einsum("bld,df->blf", x_bld, self.w_gate[...].astype(dtype))
    return sharding.constrain(h, ("batch", "length", "act_mlp"), self.rules)

  def __call__(self, x_bld):
    return jnp.einsum("blf,fd->bld", self.hidden(x_bld), self.w_out[...].astype(x_bld.dtype))
