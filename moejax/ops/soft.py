"""Soft MoE dispatch (Puigcerver et al. 2023): slots are convex mixes of tokens and back.

Pure jax.numpy. Letters: g groups, s tokens, n = E*P slots, e experts, p slots per expert,
d d_model. No token is dropped; every token receives a convex mix of all slot outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.ops import capacity


def soft_moe(
  x_gsd: jax.Array,
  routing,
  expert_fn: Callable[[jax.Array], jax.Array],
  *,
  num_experts: int,
  rules: sharding.Rules | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs the experts on soft slots.

  Args:
    x_gsd: [G, S, D] tokens.
    routing: a SoftRouting with dispatch_weights / combine_weights [G, S, E*P].
    expert_fn: [G, E, P, D] -> [G, E, P, D], expert e on its P slots.
    num_experts: E.
    rules: sharding rules for the slot buffers (None: no constraint).

  Returns:
    (y [G, S, D] in x's dtype, metrics {}).
  """
  g, s, d = x_gsd.shape
  n = routing.dispatch_weights.shape[-1]
  if n % num_experts:
    raise ValueError(f"{n} slots are not a multiple of {num_experts=}")
  dtype = x_gsd.dtype
  slots_gnd = jnp.einsum("gsn,gsd->gnd", routing.dispatch_weights.astype(dtype), x_gsd)
  slots_gepd = capacity.exchange_to_experts(
    slots_gnd.reshape(g, num_experts, n // num_experts, d), rules
  )
  out_gepd = capacity.exchange_to_groups(expert_fn(slots_gepd), rules)
  y_gsd = jnp.einsum(
    "gsn,gnd->gsd",
    routing.combine_weights.astype(jnp.float32),
    out_gepd.reshape(g, n, d).astype(jnp.float32),
  )
  return y_gsd.astype(dtype), {}
