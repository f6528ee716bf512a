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

Integration (`SmearRouter`, COMPUTES_OUTPUT): the layer's ExpertBank holds the E experts and
the router computes the merged-expert output itself (no dispatch, no capacity, no aux loss):
every token uses all E experts' weights. The mean runs over each token's whole SEQUENCE, not its
routing group: `sequence_mean` scans the flattened 'sequence'-layout stream (consecutive groups
hold consecutive tokens) segmented by sequence id, so any group_size gives the same function.
The 'position' layout is refused (a group there holds one position of many sequences, so a
sequence's running mean would cross groups in a strided order). 'causal' is causal in the
'sequence' layout; 'example' is not (allow_noncausal). Decoding is refused: it would need the
running sum of x and the token count per sequence and layer cached next to the KV cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry
from moejax.ops import aux_losses

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
  return probs_of_mean(u_sd, w_router_de, b_router_e, ln_scale_d, ln_bias_d)


def probs_of_mean(u_sd, w_router_de, b_router_e, ln_scale_d, ln_bias_d) -> jax.Array:
  """softmax(LayerNorm(u) W_r + b_r), float32 [S, E], from the router inputs u [S, D]."""
  u_sd = u_sd.astype(jnp.float32)
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


def sequence_mean(x_td: jax.Array, sequence_ids_t: jax.Array, *, causal: bool) -> jax.Array:
  """Per-sequence mean of a stream whose sequences are contiguous runs of equal ids.

  Args:
    x_td: float[T, D] the stream (the 'sequence' layout's groups, flattened in order).
    sequence_ids_t: int[T] sequence of each token; a sequence's tokens are consecutive.
    causal: True: row t is the mean of its sequence's x up to t; False: of its whole sequence.

  Returns:
    float32[T, D].
  """
  x_td = x_td.astype(jnp.float32)
  num_tokens = x_td.shape[0]
  ones_t1 = jnp.ones((num_tokens, 1), jnp.float32)
  start_t = jnp.concatenate([jnp.ones((1,), bool), sequence_ids_t[1:] != sequence_ids_t[:-1]])
  if causal:
    # A segmented running sum: a later segment start resets the sum.
    def add(left, right):
      (left_start, left_sum), (right_start, right_sum) = left, right
      return left_start | right_start, jnp.where(right_start, right_sum, left_sum + right_sum)

    _, total_td = jax.lax.associative_scan(add, (start_t[:, None], x_td))
    _, count_t1 = jax.lax.associative_scan(add, (start_t[:, None], ones_t1))
  else:
    segment_t = jnp.cumsum(start_t) - 1  # runs numbered 0, 1, ... in stream order
    total_td = jax.ops.segment_sum(x_td, segment_t, num_segments=num_tokens)[segment_t]
    count_t1 = jax.ops.segment_sum(ones_t1, segment_t, num_segments=num_tokens)[segment_t]
  return total_td / count_t1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergeRouting:
  """SMEAR's routing: the merge weights of every token (no pairs, nothing to dispatch).

  Attributes:
    probs_gse: float32[G, S, E], rows sum to 1.
  """

  probs_gse: jax.Array
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SmearOptions(base.RouterOptions):
  """Options of the `smear` family (`model.moe.smear.*`).

  Attributes:
    level: 'causal' (router input = running mean of the token's sequence, for decoders) or
      'example' (mean of the whole sequence: the paper's per-example router; not causal).
    init_std: standard deviation of the normal router weight init.
  """

  level: str = base.option("causal", choices=LEVELS)
  init_std: float = 0.02


@registry.register("smear")
class SmearRouter(base.Router):
  """SMEAR: soft merging of the E experts' weights by router probabilities, every token."""

  Options = SmearOptions
  READS_TOKENS = True
  COMPUTES_OUTPUT = True

  @classmethod
  def check(cls, options: SmearOptions, moe: base.MoESettings) -> None:
    if moe.group_layout != "sequence":
      raise errors.ConfigError(
        f"model.moe.group_layout={moe.group_layout!r}: the smear router averages each "
        "sequence's tokens in order; use model.moe.group_layout='sequence' (the 'causal' level "
        "is causal there)"
      )

  @classmethod
  def causal_in_sequence(cls, options: SmearOptions, moe: base.MoESettings) -> bool:
    return options.level == "causal"

  @classmethod
  def decode_refusal(cls, options: SmearOptions, moe: base.MoESettings) -> str | None:
    return (
      "the smear router's input is a running mean over each sequence, which KV-cache decoding "
      "does not cache; evaluate with moejax.evaluate (full sequences) instead"
    )

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: SmearOptions, rngs: nnx.Rngs):
    """Builds the router: LayerNorm (scale 1, bias 0) and a [D, E] linear with bias 0."""
    self.check(options, moe)
    self.num_experts = moe.num_experts
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)
    self.bias = nnx.Param(jnp.zeros((moe.num_experts,), jnp.float32), axes=(None,))
    self.ln_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), axes=("embed",))
    self.ln_bias = nnx.Param(jnp.zeros((d_model,), jnp.float32), axes=("embed",))

  def __call__(self, x_gsd, *, train: bool, rng=None, token_ids, sequence_ids) -> MergeRouting:
    """The merge weights of every token (train and eval alike).

    Args:
      x_gsd: [G, S, D] the layer's tokens in the 'sequence' layout.
      sequence_ids: int32 [G, S] each token's sequence (global batch row).

    Returns:
      MergeRouting; metrics: expert_load [E] (mean merge weight), router_entropy.
    """
    del train, rng, token_ids
    num_groups, num_tokens, dim = x_gsd.shape
    u_td = sequence_mean(
      x_gsd.reshape(-1, dim),
      sequence_ids.reshape(-1),
      causal=self.options.level == "causal",
    )
    params = (self.kernel[...], self.bias[...], self.ln_scale[...], self.ln_bias[...])
    probs_te = probs_of_mean(u_td, *params)
    metrics = {
      "expert_load": jnp.mean(probs_te, axis=0),
      "router_entropy": aux_losses.router_entropy(probs_te),
    }
    probs_gse = probs_te.reshape(num_groups, num_tokens, self.num_experts)
    return MergeRouting(probs_gse, metrics=metrics)

  def compute(self, x_gsd, routing: MergeRouting, experts, *, train: bool):
    """(y [G, S, D], {}) : every token through its merged expert (`smear_merged_ffn`)."""
    del train
    w = experts.weights()
    merged = jax.vmap(
      lambda x_sd, p_se: smear_merged_ffn(
        x_sd, p_se, w["w_in"], w["w_gate"], w["w_out"], w["activation"]
      )
    )
    return merged(x_gsd, routing.probs_gse), {}
