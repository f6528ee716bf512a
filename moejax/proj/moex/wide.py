"""The wide-MLP view of an MoE layer: the gated hidden code z_hat (MoE-X, Yang et al. 2025).

With experts E_j(x) = W_out^j act(W_in^j x), the MoE output sum_j w_j E_j(x) equals W_out z_hat,
where W_out = [W_out^1; ...; W_out^E] is [E*F, D] and z_hat = [w_1 h^1, ..., w_E h^E] is the
[E*F] concatenation of each expert's hidden code times its gate (zeros for experts the token did
not reach). Neuron id = e * F + i. So an MoE layer is one wide MLP whose code is sparse across
experts (top-k) and, with ReLU experts, within them.

Design choices:
- z_hat is computed from the layer's own routing steps (`MoELayer.route`, `kept_pairs`), the
  extension point the core offers to probes, so it is the code of exactly the pairs the
  layer's dispatch computes.
- Which pairs count is the dispatch's: every valid pair for `dropless`; for `capacity` and
  `all_to_all` the pairs that fit the capacity (same `compute_slots` as the dispatch), so a dropped
  pair has zero code exactly as it has zero output.
- The hidden code is evaluated for every expert on every token ([E, T, F], E/k times the routed
  FLOPs of the encoder) and masked by the gates: simple and dispatch-independent; meant for
  analysis, not for training steps.
- Shared experts (DeepSeekMoE) are a separate dense MLP and are not part of z_hat; soft routing
  mixes tokens into slots, so it has no per-token code and is refused.

Letters: g groups, s tokens per group, t = g*s tokens, e experts, f expert hidden, d d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops import routing as routing_lib


def gate_matrix(routing: routing_lib.SparseRouting, kept_gn, num_tokens: int, num_experts: int):
  """float32[G, S, E]: each token's total combine weight per expert over its kept pairs."""

  def one_group(token_n, expert_n, weight_n, kept_n):
    weight_n = jnp.where(kept_n, weight_n.astype(jnp.float32), 0.0)
    gates = jnp.zeros((num_tokens, num_experts), jnp.float32)
    return gates.at[token_n, expert_n].add(weight_n)

  return jax.vmap(one_group)(
    routing.token_index, routing.expert_index, routing.combine_weight, kept_gn
  )


def gated_hidden(experts, x_gsd, gates_gse):
  """z_hat [G, S, E*F] (float32): every expert's hidden code of every token times its gate."""
  g, s, d = x_gsd.shape
  e = gates_gse.shape[-1]
  x_etd = jnp.broadcast_to(x_gsd.reshape(1, g * s, d), (e, g * s, d))
  h_etf = experts._hidden_rows(x_etd).astype(jnp.float32)
  z_gsef = jnp.swapaxes(h_etf, 0, 1).reshape(g, s, e, -1) * gates_gse[..., None]
  return z_gsef.reshape(g, s, -1)


def moe_hidden_code(layer, x_bld, *, train: bool):
  """z_hat [B, L, E*F] of MoELayer `layer` on its input x_bld (see the module docstring).

  Uses the layer's own routing steps (`route`, `kept_pairs`), so the code is exactly the one of
  the pairs the layer's dispatch computes.
  """
  x_gsd, routing = layer.route(x_bld, train=train, rng=None)
  if isinstance(routing, routing_lib.SoftRouting):
    raise ValueError("z_hat is defined for sparse routers only (soft routing mixes tokens)")
  num_experts = layer.settings.num_experts
  gates = gate_matrix(routing, layer.kept_pairs(routing, train=train), x_gsd.shape[1], num_experts)
  z_gsk = gated_hidden(layer.experts, x_gsd, gates)
  return layer.from_groups(z_gsk, (*x_bld.shape[:2], z_gsk.shape[-1]))


def stacked_decoder(experts) -> jax.Array:
  """W_out stacked to [E*F, D]: row e*F + i is neuron i of expert e (the wide MLP's decoder)."""
  w_efd = experts.w_out[...]
  return w_efd.reshape(-1, w_efd.shape[-1])
