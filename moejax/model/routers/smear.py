"""SMEAR: soft merging of experts, one merged expert per token (or per example), no discrete choice.

Muqeeth, Liu, Raffel, "Soft Merging of Experts with Adaptive Routing", 2023, arXiv:2306.03745
(reference code: r-three/smear, routing estimator `parameter_averaging_routing`).

The router gives p = softmax(LN(u) W_r + b_r) over E experts of identical structure; the layer
applies ONE expert whose every parameter tensor is the p-weighted average of the experts'
tensors, theta_bar = sum_e p_e theta_e. No aux loss; train and eval alike; the router learns
by ordinary backprop. In the paper u is the mean of an example's positions (encoders) or of the
encoder output (T5 decoders), one merged expert per example.

Router levels (`smear_router_probs(level=...)`):
- 'causal' (for decoder-only LMs; variant (ii) of the design notes): u_t = mean of x_{<=t} of
  the token's own sequence, one distribution per token. Not in the paper; it avoids the leak of
  a whole-sequence mean into earlier positions.
- 'example': u = mean over the group's (unmasked) positions, the paper's per-example router;
  padding is masked (the reference code does not mask it). Only causal for encoders, or when u
  comes from a known prefix.

Expert computation (`smear_merged_ffn`): for an FFN expert y = act(x W_in) [* (x W_gate)] W_out,
merging the weights per token equals mixing pre-activations: a_t = sum_e p_t,e x_t W_in_e, then
h_t = act(a_t) (times the mixed gate branch), then y_t = sum_e p_t,e h_t W_out_e. That is exact
parameter merging with static shapes and without a [S, D, F] merged weight per token, at E
times the FLOPs of one expert ("dense compute": meant for small E or small experts). Experts
with biases would merge them the same way (sum_e p_e b_e); moejax experts have none.
Not implemented: the reference code's LayerNorm-scaled router weight columns (gain initialised
to 1e-2), router jitter and expert dropout (both off by default there).

Integration notes: the layer needs its own expert compute (no dispatch, no capacity): all E
experts' weights are used by every token. The 'causal' level is causal in the 'sequence' group
layout when the group is the whole sequence (the running mean sees positions <= t); with groups
that hold pieces of sequences, or with the 'position' layout, the running mean must run over the
full sequence, before grouping. At decode time the running sum of x and the token count per
sequence and layer must be cached (a [B, D] state next to the KV cache); 'example' routing
decodes only with a prefix fixed before generation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LEVELS = ("causal", "example")
_LN_EPS = 1e-6


def masked_mean(x_sd: jax.Array, mask_s: jax.Array | None = None, *, causal: bool) -> jax.Array:
  """Mean of the unmasked positions: running (causal, [S, D]) or of the whole group ([S, D]).

  Args:
    x_sd: float[S, D].
    mask_s: bool or 0/1 [S] positions that count (False: padding); None counts all.
    causal: True: row t is the mean of the counted x_{<=t}; False: every row is the mean of all
      counted positions.

  Returns:
    float32[S, D]; a row with no counted position so far is 0.
  """
  x_sd = x_sd.astype(jnp.float32)
  weight_s = jnp.ones(x_sd.shape[:1]) if mask_s is None else mask_s.astype(jnp.float32)
  if causal:
    total_sd = jnp.cumsum(x_sd * weight_s[:, None], axis=0)
    count_s = jnp.cumsum(weight_s)
  else:
    total_sd = jnp.broadcast_to(jnp.sum(x_sd * weight_s[:, None], axis=0), x_sd.shape)
    count_s = jnp.broadcast_to(jnp.sum(weight_s), weight_s.shape)
  return total_sd / jnp.maximum(count_s, 1.0)[:, None]


def smear_router_probs(
  x_sd: jax.Array,
  w_router_de: jax.Array,
  b_router_e: jax.Array,
  ln_scale_d: jax.Array,
  ln_bias_d: jax.Array,
  *,
  level: str = "causal",
  mask_s: jax.Array | None = None,
) -> jax.Array:
  """SMEAR routing distributions p = softmax(LayerNorm(u) W_r + b_r), float32.

  Args:
    x_sd: float[S, D] the expert inputs of one sequence (the group).
    w_router_de: float[D, E] router weights.
    b_router_e: float[E] router bias.
    ln_scale_d: float[D] LayerNorm gain.
    ln_bias_d: float[D] LayerNorm bias.
    level: 'causal' (u_t = running mean) or 'example' (u = mean of the group).
    mask_s: bool [S] positions that count in the means (False: padding); None counts all.

  Returns:
    float32[S, E], rows sum to 1 (all rows equal for 'example').
  """
  if level not in LEVELS:
    raise ValueError(f"unknown SMEAR router {level=}; use one of {LEVELS}")
  u_sd = masked_mean(x_sd, mask_s, causal=level == "causal")
  mean_s1 = jnp.mean(u_sd, axis=-1, keepdims=True)
  var_s1 = jnp.mean(jnp.square(u_sd - mean_s1), axis=-1, keepdims=True)
  normed_sd = (u_sd - mean_s1) * jax.lax.rsqrt(var_s1 + _LN_EPS)
  normed_sd = normed_sd * ln_scale_d.astype(jnp.float32) + ln_bias_d.astype(jnp.float32)
  logits_se = jnp.einsum(
    "sd,de->se", normed_sd, w_router_de.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  return jax.nn.softmax(logits_se + b_router_e.astype(jnp.float32), axis=-1)


def smear_merged_ffn(
  x_sd: jax.Array,
  probs_se: jax.Array,
  w_in_edf: jax.Array,
  w_gate_edf: jax.Array | None,
  w_out_efd: jax.Array,
  activation: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Each token through the expert whose weights are the p-weighted sum of the E experts'.

  Exact merging by mixing pre-activations (see the module docstring); E times one expert's
  FLOPs and [S, E, F] + [S, E, D] intermediates.

  Args:
    x_sd: [S, D] tokens; the computation runs in this dtype.
    probs_se: float[S, E] merge weights of every token (rows sum to 1).
    w_in_edf: [E, D, F] first linear of every expert (its output goes through `activation`).
    w_gate_edf: [E, D, F] linear gate branch multiplied into the activation (GLU), or None.
    w_out_efd: [E, F, D] second linear.
    activation: elementwise function, e.g. jax.nn.silu.

  Returns:
    [S, D] in x's dtype.
  """
  dtype = x_sd.dtype
  probs_se = probs_se.astype(dtype)

  def mixed_first_linear(w_edf):
    # sum_e p_s,e (x_s W_e) = x_s (sum_e p_s,e W_e).
    return jnp.einsum("sef,se->sf", jnp.einsum("sd,edf->sef", x_sd, w_edf.astype(dtype)), probs_se)

  h_sf = activation(mixed_first_linear(w_in_edf))
  if w_gate_edf is not None:
    h_sf = h_sf * mixed_first_linear(w_gate_edf)
  out_sed = jnp.einsum("sf,efd->sed", h_sf, w_out_efd.astype(dtype))
  return jnp.einsum("sed,se->sd", out_sed, probs_se)
