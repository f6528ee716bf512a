"""Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Each expert owns P slots; every slot is a convex combination of all tokens of the group, and
every token's output a convex combination of all slot outputs. With slot parameters
Phi in R^{D x E*P}:
  logits = normalize(X) (scale * normalize(Phi))      [S, E*P]
  D = softmax over tokens (axis 0, per slot)          dispatch weights
  C = softmax over all E*P slots (axis 1, per token)  combine weights
moejax/ops/soft.py then forms the slot inputs D^T X, runs expert e on its P slots and returns
Y = C (slot outputs).

Design choices:
- l2 normalisation of each token (over D) and of each slot column of Phi (over D), as
  v * rsqrt(sum v^2 + 1e-6); the learned scalar `scale` (init `model.moe.soft_init_scale`,
  default 1 as in the paper's code) multiplies the normalised Phi
  (the paper's choice of which side to scale is free; this matches its reference code). With
  both sides normalised, logits are scaled cosines, so routing starts near-uniform and `scale`
  learns how sharp it becomes; normalisation keeps the softmaxes stable when d_model grows.
- Phi is initialised lecun-normal (std 1/sqrt(D)), so its columns start with norm ~1 and the
  gradient through the normalisation is not inflated by a tiny init.
- No discrete choice, no dropping, no capacity, no aux loss. Router math in float32.
- Metrics: the mean largest dispatch weight of a slot (1/S = uniform mix of the group, 1 = the
  slot copies one token) and the mean largest combine weight of a token (1/(E*P) to 1).
- NOT causal: every slot mixes all tokens of its group, so in a decoder use
  model.moe.group_layout='position' (see docs/causality.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry

NORM_EPS = 1e-6


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  """x * rsqrt(sum(x^2, axis) + 1e-6), in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + NORM_EPS)


def route_soft(x_sd: jax.Array, phi_dn: jax.Array, scale: jax.Array) -> base.SoftRouting:
  """Soft MoE dispatch and combine weights of one group.

  Args:
    x_sd: float[S, D] tokens of the group.
    phi_dn: float32[D, E*P] slot parameters; column n is slot n (expert n // P).
    scale: float32 scalar multiplying the normalised slot parameters.

  Returns:
    SoftRouting with dispatch_weights float32[S, E*P] (each column sums to 1 over tokens) and
    combine_weights float32[S, E*P] (each row sums to 1 over slots); no aux losses;
    metrics dispatch_max_weight, combine_max_weight (float32 scalars).
  """
  x_sd = l2_normalize(x_sd, axis=-1)
  phi_dn = scale.astype(jnp.float32) * l2_normalize(phi_dn, axis=0)
  # HIGHEST: keep the router matmul in true float32 where the default would use bf16/TF32.
  logits_sn = jnp.einsum("sd,dn->sn", x_sd, phi_dn, precision=jax.lax.Precision.HIGHEST)
  dispatch_sn = jax.nn.softmax(logits_sn, axis=0)
  combine_sn = jax.nn.softmax(logits_sn, axis=1)
  metrics = {
    "dispatch_max_weight": jnp.mean(jnp.max(dispatch_sn, axis=0)),
    "combine_max_weight": jnp.mean(jnp.max(combine_sn, axis=1)),
  }
  return base.SoftRouting(
    dispatch_weights=dispatch_sn, combine_weights=combine_sn, aux_losses={}, metrics=metrics
  )


@dataclasses.dataclass(frozen=True)
class SoftMoEOptions(base.RouterOptions):
  """Options of the `soft_moe` family (`model.moe.soft_moe.*`).

  Attributes:
    slots_per_expert: P.
    init_scale: initial value of the learned scalar `scale` (> 0). Logits are scaled cosines in
      [-scale, scale], so at 1 every softmax starts close to uniform.
  """

  slots_per_expert: int = base.option(1, ge=1)
  init_scale: float = base.option(1.0, gt=0)


@registry.register("soft_moe")
class SoftMoERouter(base.Router):
  """Learned slots Phi [D, E*P] and scale; routes G groups softly.

  Never causal in a sequence: every slot is a mix of all tokens of the group, later ones included.
  """

  Options = SoftMoEOptions

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: SoftMoEOptions, rngs: nnx.Rngs
  ):
    """Builds Phi (lecun-normal, `rngs.params`) and the scale; top_k is unused."""
    self.options = options
    self.num_experts = moe.num_experts
    self.slots_per_expert = options.slots_per_expert
    init = jax.nn.initializers.lecun_normal()
    # Shape: [D, E*P]; slot n belongs to expert n // P (the layout ops/soft.py reshapes to).
    self.phi = nnx.Param(
      init(rngs.params(), (d_model, moe.num_experts * options.slots_per_expert), jnp.float32),
      axes=("embed", None),
    )
    self.scale = nnx.Param(jnp.full((), options.init_scale, jnp.float32), axes=())

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SoftRouting:
    """Routes every group softly: SoftRouting with [G, S, E*P] weights (train and eval alike)."""
    del train, rng
    routing = jax.vmap(route_soft, in_axes=(0, None, None))(x_gsd, self.phi[...], self.scale[...])
    return base.average_over_groups(routing)
