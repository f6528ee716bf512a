"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

Router logits H = x W_g + n * (softplus(x W_noise) + noise_epsilon), n ~ N(0, 1) drawn per token
and expert at training time only (at evaluation H = x W_g). Each token keeps the k largest H;
its gates G are the softmax over those k values (0 elsewhere).

Two CV^2 losses balance the experts (CV^2 = variance / mean^2 over experts, population variance):
- importance_loss = CV^2(Importance), Importance_e = sum_s G_s,e;
- load_loss = CV^2(Load), Load_e = sum_s Phi((clean_s,e - kth_excluding_s,e) / std_s,e): the
  probability that expert e would still be in token s's top k if only e's noise were redrawn.
  kth_excluding_s,e is the k-th largest noisy logit among the OTHER experts: the (k+1)-th overall
  when e is in the top k, the k-th otherwise. With k = E every expert is always chosen and
  Load_e = S.

Design choices:
- W_g and W_noise start at ZERO, as in the paper: no signal, some noise, so early routing is
  random and balanced. At evaluation all logits then tie; `jax.lax.top_k` breaks ties by index,
  so every token still gets k distinct experts (0..k-1), with gates 1/k.
- At evaluation (no noise) Load_e is the plain count of tokens that chose e: the smooth formula
  needs the noise to be defined, and the eval losses are only logged, never trained on.
- The gradient reaches W_g through the gates (k > 1; with k = 1 the gate is always 1) and
  through the load loss, and W_noise through the noisy logits and the load loss.
- The paper has no capacity limit (it relies on the balancing losses); here the capacity is the
  token-choice one, C = ceil(capacity_factor * S * k / E), with the same pair order as top-k:
  choice-rank-major (all first choices in token order, then all second choices, ...), choices
  sorted by decreasing noisy logit. Causal within a sequence only for k = 1 (as TopKRouter).
- Metrics: expert_load (fraction of the S*k choices per expert, before capacity dropping) and
  router_entropy of softmax(x W_g) (the clean, noise-free routing distribution).
- Router math in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry
from moejax.ops import aux_losses

_CV_EPS = 1e-10  # keeps CV^2 finite when every expert has zero importance


def cv_squared(values_e: jax.Array) -> jax.Array:
  """Squared coefficient of variation over experts: population variance / (mean^2 + 1e-10).

  Args:
    values_e: float[E].

  Returns:
    float32 scalar; 0 for a single expert or equal values.
  """
  values_e = values_e.astype(jnp.float32)
  if values_e.shape[0] == 1:
    return jnp.zeros((), jnp.float32)
  mean = jnp.mean(values_e)
  return jnp.mean(jnp.square(values_e - mean)) / (jnp.square(mean) + _CV_EPS)


def route_noisy_top_k(
  clean_se: jax.Array,
  noise_std_se: jax.Array,
  *,
  top_k: int,
  rng: jax.Array | None = None,
) -> base.SparseRouting:
  """Noisy top-k routing of one group.

  Args:
    clean_se: float[S, E] clean logits x W_g (float32).
    noise_std_se: float[S, E] noise scale softplus(x W_noise) + noise_epsilon, > 0.
    top_k: k, experts per token, 1 <= k <= E.
    rng: PRNG key for the noise n = jax.random.normal(rng, (S, E)); None means no noise
      (evaluation), and then the load is a count of choices.

  Returns:
    SparseRouting with N = S*k pairs; pair r*S + s is token s's (r+1)-th choice (by noisy
    logit), all valid, weight = softmax over the token's k kept noisy logits.
    aux_losses: importance_loss, load_loss.
    metrics: expert_load float32[E], router_entropy.
  """
  num_tokens, num_experts = clean_se.shape
  base.check_top_k(top_k, num_experts)
  clean_se = clean_se.astype(jnp.float32)
  noise_std_se = noise_std_se.astype(jnp.float32)
  if rng is None:
    noisy_se = clean_se
  else:
    noisy_se = clean_se + jax.random.normal(rng, clean_se.shape, jnp.float32) * noise_std_se

  # Shape: [S, K+1] (K when K = E), sorted by decreasing noisy logit; ties go to the lower index.
  top_vals, top_idx = base.top_k(noisy_se, min(top_k + 1, num_experts))
  expert_sk = top_idx[:, :top_k]
  gate_sk = jax.nn.softmax(top_vals[:, :top_k], axis=-1)

  # G [S, E]: the gates scattered to their experts (0 for the others).
  choice_ske = jax.nn.one_hot(expert_sk, num_experts, dtype=jnp.float32)
  gates_se = jnp.einsum("sk,ske->se", gate_sk, choice_ske)
  chosen_se = jnp.sum(choice_ske, axis=1)  # 0/1: the k experts of a token are distinct
  if rng is None or top_k == num_experts:
    # No noise: the count of choices. k = E: every expert always chosen, Load_e = S exactly.
    load_e = jnp.sum(chosen_se, axis=0)
  else:
    # kth_excluding: the (k+1)-th largest if e is in the top k, else the k-th largest.
    kth_s1, next_s1 = top_vals[:, top_k - 1 : top_k], top_vals[:, top_k : top_k + 1]
    threshold_se = jnp.where(chosen_se > 0, next_s1, kth_s1)
    prob_in_top_k_se = jax.scipy.stats.norm.cdf((clean_se - threshold_se) / noise_std_se)
    load_e = jnp.sum(prob_in_top_k_se, axis=0)
  losses = {
    "importance_loss": cv_squared(jnp.sum(gates_se, axis=0)),
    "load_loss": cv_squared(load_e),
  }
  metrics = {
    "expert_load": jnp.mean(chosen_se, axis=0) / top_k,
    "router_entropy": aux_losses.router_entropy(jax.nn.softmax(clean_se, axis=-1)),
  }
  return base.rank_major_routing(expert_sk, gate_sk, aux_losses=losses, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class NoisyTopKOptions(base.RouterOptions):
  """Options of the `noisy_top_k` family (`model.moe.noisy_top_k.*`).

  Attributes:
    noise_epsilon: added to softplus(x W_noise): the least noise scale at training time.
    importance_loss_weight: weight of CV^2(importance).
    load_loss_weight: weight of CV^2(smooth load).
  """

  noise_epsilon: float = base.option(1e-2, ge=0)
  importance_loss_weight: float = 1e-2
  load_loss_weight: float = 1e-2


@registry.register("noisy_top_k", aliases=("noisy_topk",))
class NoisyTopKRouter(base.TokenChoiceRouter):
  """Noisy top-k gating over G groups: gate and noise kernels W_g, W_noise [D, E], zero init."""

  Options = NoisyTopKOptions
  AUX_LOSSES = ("importance_loss", "load_loss")

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: NoisyTopKOptions, rngs: nnx.Rngs
  ):
    """Builds the router; both kernels start at zero (`rngs` is unused)."""
    del rngs
    base.check_top_k(moe.top_k, moe.num_experts)
    self.num_experts = moe.num_experts
    self.top_k = moe.top_k
    self.options = options
    # Shape: [D, E] each; experts are few, so the E axis stays replicated.
    zeros = lambda: jnp.zeros((d_model, moe.num_experts), jnp.float32)
    self.w_gate = nnx.Param(zeros(), axes=("embed", None))
    self.w_noise = nnx.Param(zeros(), axes=("embed", None))

  def __call__(
    self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> base.SparseRouting:
    """Routes every group (N = S*k pairs); `rng` draws the logits' noise (needed to train)."""
    clean_gse = base.router_logits(x_gsd, self.w_gate[...])
    noise_std_gse = (
      jax.nn.softplus(base.router_logits(x_gsd, self.w_noise[...])) + self.options.noise_epsilon
    )
    route = functools.partial(route_noisy_top_k, top_k=self.top_k)
    rng = base.need_rng(rng, "the noisy_top_k router") if train else None
    return base.route_groups(route, clean_gse, noise_std_gse, rng=rng)
