"""MoE-X sparsity-aware routing (Yang et al. 2025): send each token to its sparsest experts.

For ReLU experts E_j(x) = W_out^j relu(W_in^j x), treat the F encoder columns of expert j as
samples of a Gaussian: per input dim, mu^j = mean over neurons and var^j = variance over neurons
of W_in^j [D, F]. For token x, a neuron's pre-activation is then ~ N(mu_h, sigma_h^2) with
mu_h = x . mu^j (+ mean bias; moejax experts have none) and sigma_h^2 = (x*x) . var^j, so the
expected fraction of positive (active) neurons is Phi(mu_h / sigma_h). Score = -Phi: the top-k
experts by score are those expected to be sparsest; the gates are a softmax over the k chosen
scores.

Design choices (details the paper leaves open are options, see CONFIG_OPTIONS):
- `stop_gradient_stats`: no gradient through the column statistics into W_in (default off:
  gradients flow, so routing also pushes the chosen experts to become sparser).
- `learned_mix`: score = -Phi + learned_mix * (x W_r), mixing in a learned linear router
  (0 = pure MoE-X; the kernel exists either way so checkpoints keep one shape).
- `load_balance_loss_weight`: weight of the Switch load-balance loss (computed on softmax of the
  scores over all experts); 0 by default, as the paper's equations have no balance loss.
- Metric `score_l0_rank_corr`: per token, the Spearman correlation across experts between the
  score and the true fraction of positive pre-activations, averaged over tokens (the paper's
  Fig. 9 shows it negative). It evaluates every expert's encoder on every token (E/k x the routed
  encoder FLOPs), so it is computed in evaluation only (train=False: moejax.evaluate reports it),
  and can be turned off (`log_l0_correlation`).
- Routing math in float32 (HIGHEST precision matmuls), like the other routers.

Letters: g groups, s tokens, d d_model, e experts, f expert hidden.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry
from moejax.ops import aux_losses

_HI = jax.lax.Precision.HIGHEST


def expert_column_stats(w_in_edf: jax.Array) -> tuple[jax.Array, jax.Array]:
  """mu, var float32[E, D]: mean and variance over each expert's F neurons, per input dim."""
  w = w_in_edf.astype(jnp.float32)
  return jnp.mean(w, axis=-1), jnp.var(w, axis=-1)


def positive_fraction_estimate(x_sd, mu_ed, var_ed, bias_mean_e=None) -> jax.Array:
  """float32[S, E]: Phi(mu_h / sigma_h), the expected fraction of active neurons per expert."""
  x = x_sd.astype(jnp.float32)
  mu_h = jnp.einsum("sd,ed->se", x, mu_ed, precision=_HI)
  if bias_mean_e is not None:
    mu_h = mu_h + bias_mean_e
  sigma_h = jnp.sqrt(jnp.einsum("sd,ed->se", x * x, var_ed, precision=_HI) + 1e-8)
  return jax.scipy.special.ndtr(mu_h / sigma_h)


def true_positive_fraction(x_sd, w_in_edf) -> jax.Array:
  """float32[S, E]: the measured fraction of each expert's neurons with pre-activation > 0."""
  pre_sef = jnp.einsum("sd,edf->sef", x_sd.astype(jnp.float32), w_in_edf.astype(jnp.float32))
  return jnp.mean((pre_sef > 0).astype(jnp.float32), axis=-1)


def _ranks(a, axis=-1):
  return jnp.argsort(jnp.argsort(a, axis=axis), axis=axis).astype(jnp.float32)


def rank_correlation(a_se, b_se) -> jax.Array:
  """Mean over rows of the Spearman correlation across the last axis (ties broken by order)."""
  ra, rb = _ranks(a_se), _ranks(b_se)
  ra, rb = ra - jnp.mean(ra, -1, keepdims=True), rb - jnp.mean(rb, -1, keepdims=True)
  denom = jnp.sqrt(jnp.sum(ra * ra, -1) * jnp.sum(rb * rb, -1))
  return jnp.mean(jnp.sum(ra * rb, -1) / jnp.maximum(denom, 1e-12))


def route_scores(score_se: jax.Array, *, top_k: int) -> base.SparseRouting:
  """Top-k of the scores of one group, gates = softmax over the k chosen scores.

  Returns SparseRouting with N = S*k pairs in choice-rank-major order (as top_k.route_top_k),
  aux loss load_balance_loss (unweighted) and metric expert_load [E].
  """
  num_tokens, num_experts = score_se.shape
  chosen_score_sk, expert_sk = base.top_k(score_se, top_k)
  gate_sk = jax.nn.softmax(chosen_score_sk, axis=-1)
  chosen_se = base.chosen_indicator(expert_sk, num_experts)
  probs_se = jax.nn.softmax(score_se, axis=-1)
  return base.rank_major_routing(
    expert_sk,
    gate_sk,
    aux_losses={"load_balance_loss": aux_losses.load_balance_loss(probs_se, chosen_se)},
    metrics={"expert_load": jnp.mean(chosen_se, axis=0) / top_k},
  )


@dataclasses.dataclass(frozen=True)
class MoEXOptions:
  """Options of the `moex` family (`model.moe.moex.*`).

  Attributes:
    stop_gradient_stats: no gradient through the encoder statistics into W_in.
    learned_mix: score = -Phi + learned_mix * (x W_r) (0 = pure MoE-X).
    log_l0_correlation: the evaluation metric score_l0_rank_corr (costs E/k x encoder FLOPs).
    init_std: standard deviation of the normal kernel init of W_r.
    load_balance_loss_weight: weight of the Switch load-balance loss on softmax(scores); 0 as in
      the paper's equations.
  """

  stop_gradient_stats: bool = False
  learned_mix: float = 0.0
  log_l0_correlation: bool = True
  init_std: float = 0.02
  load_balance_loss_weight: float = 0.0


@registry.register("moex")
class MoEXRouter(base.TokenChoiceRouter):
  """Sparsity-aware top-k routing from the experts' encoder statistics (needs the expert bank)."""

  Options = MoEXOptions
  AUX_LOSSES = ("load_balance_loss",)
  READS_EXPERT_WEIGHTS = True  # MoELayer passes `experts=` to __call__

  @classmethod
  def upcycle_refusal(cls, options: MoEXOptions, noise: float) -> str | None:
    # moex scores experts from their own weights only: exact copies tie, the tied experts are
    # chosen together with equal gates, get equal gradients and stay copies for good.
    if noise or options.learned_mix:
      return None
    return (
      "the experts start as exact copies that moex cannot tell apart, so they are chosen "
      "together and stay copies; set init.from_dense_noise (e.g. 0.01) or "
      "model.moe.moex.learned_mix > 0"
    )

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: MoEXOptions, rngs: nnx.Rngs):
    """Builds the router: the learned kernel W_r [D, E] (`rngs.params`) and the options."""
    base.check_top_k(moe.top_k, moe.num_experts)
    self.num_experts, self.top_k = moe.num_experts, moe.top_k
    self.options = options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, options.init_std)

  def scores(self, x_gsd, w_in_edf) -> jax.Array:
    """float32[G, S, E]: -Phi(mu_h / sigma_h) (+ learned_mix * x W_r)."""
    mu_ed, var_ed = expert_column_stats(w_in_edf)
    if self.options.stop_gradient_stats:
      mu_ed, var_ed = jax.lax.stop_gradient(mu_ed), jax.lax.stop_gradient(var_ed)
    x = x_gsd.astype(jnp.float32)
    score = -jax.vmap(lambda xs: positive_fraction_estimate(xs, mu_ed, var_ed))(x)
    if self.options.learned_mix:
      score = score + self.options.learned_mix * base.router_logits(x, self.kernel[...])
    return score

  def __call__(self, x_gsd, *, train: bool, rng=None, experts=None) -> base.SparseRouting:
    """Routes [G, S, D] tokens; `experts` is the layer's ExpertBank (w_in [E, D, F])."""
    del rng
    if experts is None:
      raise ValueError("the moex router needs the expert bank: call it through MoELayer")
    w_in = experts.w_in[...]
    score_gse = self.scores(x_gsd, w_in)
    routing = base.route_groups(lambda sc: route_scores(sc, top_k=self.top_k), score_gse)
    if self.options.log_l0_correlation and not train:
      x_td = jax.lax.stop_gradient(x_gsd.reshape(-1, x_gsd.shape[-1]))
      l0_te = true_positive_fraction(x_td, jax.lax.stop_gradient(w_in))
      score_te = jax.lax.stop_gradient(score_gse.reshape(-1, self.num_experts))
      metrics = {**routing.metrics, "score_l0_rank_corr": rank_correlation(score_te, l0_te)}
      routing = dataclasses.replace(routing, metrics=metrics)
    return routing
