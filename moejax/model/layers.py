"""Small building blocks shared by the model: parameter init, RMSNorm, rotary embeddings, MLP.

Einsum letters: b batch, l length, d d_model, f hidden (d_ff).

Parameters are stored in `param_dtype` (float32 by default, the only copy: there is no separate
master copy) and cast to the compute dtype where they are used. Intermediates are tagged with the
remat names of moejax.ops.remat (MLP_WI, MLP_WO) so the name-based remat policies can save them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import sharding
from moejax.ops import remat


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype=jnp.float32) -> nnx.Param:
  """A normal(std) parameter annotated with logical axes (read by moejax.sharding).

  Drawn in float32 whatever `dtype` (the storage dtype), so every dtype starts from the same
  values up to rounding.
  """
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=tuple(axes))


def activation_fn(name: str):
  """Elementwise activation by name; 'swiglu' uses silu on the gate branch."""
  return {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "swiglu": jax.nn.silu}[name]


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis (or, for a tuple `dim`, over the last len(dim)
  axes jointly), computed in float32, returned in the input dtype.

  `axes`: the logical axes of the scale ("embed" over d_model, "kv" over a head dimension).
  """

  def __init__(self, dim: int | tuple, *, eps: float = 1e-6, axes=("embed",), dtype=jnp.float32):
    shape = (dim,) if isinstance(dim, int) else tuple(dim)
    self.scale = nnx.Param(jnp.ones(shape, dtype), axes=tuple(axes))
    self.norm_axes = tuple(range(-len(shape), 0))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(x32 * x32, axis=self.norm_axes, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


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
    param_dtype=jnp.float32,
  ):
    self.activation = activation
    self.rules = rules
    make = lambda shape, axes, std: param(rngs, shape, axes, std, param_dtype)
    self.w_in = make((d_model, d_ff), ("embed", "mlp"), init_std)
    self.w_gate = (
      make((d_model, d_ff), ("embed", "mlp"), init_std) if activation == "swiglu" else None
    )
    self.w_out = make((d_ff, d_model), ("mlp", "embed"), out_std)

  def hidden(self, x_bld):
    """The post-activation hidden code [batch, length, d_ff] (used for interpretability too)."""
    dtype = x_bld.dtype
    h_in = jnp.einsum("bld,df->blf", x_bld, self.w_in[...].astype(dtype))
    h = activation_fn(self.activation)(checkpoint_name(h_in, remat.MLP_WI))
    if self.w_gate is not None:
      gate = jnp.einsum("bld,df->blf", x_bld, self.w_gate[...].astype(dtype))
      h = h * checkpoint_name(gate, remat.MLP_WI)
    return sharding.constrain(h, ("batch", "length", "act_mlp"), self.rules)

  def __call__(self, x_bld):
    out = jnp.einsum("blf,fd->bld", self.hidden(x_bld), self.w_out[...].astype(x_bld.dtype))
    return checkpoint_name(out, remat.MLP_WO)


class SigmoidGated(nnx.Module):
  """`module(x) * sigmoid(x w)`, one gate value per token (Qwen2-MoE's shared expert gate).

  `gate`: [d_model] float32, zeros at init (the gate starts at one half).
  """

  def __init__(self, module: nnx.Module, d_model: int):
    self.module = module
    self.gate = nnx.Param(jnp.zeros((d_model,), jnp.float32), axes=("embed",))

  def __call__(self, x_bld):
    logit_bl = jnp.einsum("bld,d->bl", x_bld.astype(jnp.float32), self.gate[...])
    return self.module(x_bld) * jax.nn.sigmoid(logit_bl)[..., None].astype(x_bld.dtype)
