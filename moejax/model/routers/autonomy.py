"""Autonomy-of-Experts: every expert scores itself by the norm of its own low-rank activation.

Lv, Xie, Qian, Wu, Sun, Kang, Wang, Yan, "Autonomy-of-Experts Models", ICML 2025,
arXiv:2501.13074 (reference code: trestad/Autonomy-of-Experts, AoE.py and the earlier moe.py).

Expert e is a SwiGLU FFN whose gate projection is factorised, W_g^e = W_down^e W_up^e:
  E_e(x) = (SiLU(x W_down^e W_up^e) * (x W_p^e)) W_o^e,
with W_down^e [D, M], W_up^e [M, F], W_p^e [D, F], W_o^e [F, D]. There is no router: every
expert computes c_e = x W_down^e (one [D, E*M] matmul for all experts), the scores are the norms
n_e = ||c_e||_2, p = softmax(n) over experts (float32), and each token takes the top-k of p. The
chosen experts continue from the cached c_e; the others stop after the [D, M] projection.

Design choices:
- Gates are p at the chosen experts WITHOUT renormalisation (the current AoE.py); the earlier
  moe.py renormalised to sum 1: `normalize=True`.
- n = sqrt(sum c^2 + 1e-12): finite gradient at c = 0.
- Aux loss: the Switch load balance on p = softmax(norms), f_e = fraction of tokens with e in
  their top-k (any rank), minimum k at balance; its weight (1e-2 as for the baselines) is
  unconfirmed and belongs to the config. No z-loss (none in the reference).
- Pairs are choice-rank-major like top-k (pair r*S + s is token s's (r+1)-th choice).
- Metrics for the known pitfall (norms grow, softmax(n) has no temperature, p gets peaked):
  mean_max_prob and mean_norm, besides expert_load and router_entropy.

Legend: S tokens, D d_model, E experts, M low rank d_low, F expert hidden, K experts per token,
N pairs, C capacity slots.

Integration (`AutonomyRouter`): the router owns W_down [E, D, M] and W_up [E, M, F] (F =
model.moe.d_expert, required); the layer's ExpertBank holds W_p (its w_in) and W_o (its w_out),
so model.activation must not be 'swiglu' (the bank's own gate branch would go unused; the AoE
gate is always SiLU(c W_up)). The router's `dispatch_experts` hands every dispatch an expert
object for E_e: the capacity dispatch runs (SiLU((x W_down) W_up) * (x W_p)) W_o on its buffers,
recomputing the [D, M] projection of the dispatched tokens instead of carrying the cached c (the
same numbers, D*M more multiply-adds per pair than caching); the grouped-matmul dispatches
(dropless, all_to_all) take the rank-M product W_down W_up as a [E, D, F] gate weight. The
gradient reaches W_down through both p and the expert compute. Keep the parameter count of the
baseline by shrinking F (D*M + M*F + 2*D*F = 2*D*F_baseline for a GELU baseline); not automatic.
Causality in the 'sequence' layout is as top-k: causal for k=1 or dropless dispatch. Decoding
needs no cache beyond attention's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry
from moejax.ops import aux_losses

_NORM_EPS = 1e-12


def low_rank_activations(x_sd: jax.Array, w_down_edm: jax.Array) -> jax.Array:
  """c_e = x W_down^e for every expert: [S, D] x [E, D, M] -> [S, E, M] in x's dtype."""
  return jnp.einsum("sd,edm->sem", x_sd, w_down_edm.astype(x_sd.dtype))


def route_autonomy(c_sem: jax.Array, *, top_k: int, normalize: bool = False) -> base.SparseRouting:
  """Autonomy-of-Experts routing of one group from the experts' own low-rank activations.

  Args:
    c_sem: float[S, E, M] c = x W_down^e of every token and expert.
    top_k: k, experts per token.
    normalize: renormalise each token's k gates to sum 1 (the earlier reference code).

  Returns:
    SparseRouting with N = S*k pairs; pair r*S + s is token s's (r+1)-th choice; weight = p.
    aux_losses: load_balance_loss (Switch form on softmax(norms)).
    metrics: expert_load float32[E], router_entropy, mean_max_prob, mean_norm.
  """
  c_sem = c_sem.astype(jnp.float32)
  norm_se = jnp.sqrt(jnp.sum(jnp.square(c_sem), axis=-1) + _NORM_EPS)
  probs_se, gate_sk, expert_sk, chosen_se = base.softmax_top_k(norm_se, top_k, normalize=normalize)
  metrics = {
    "expert_load": jnp.mean(chosen_se, axis=0) / top_k,
    "router_entropy": aux_losses.router_entropy(probs_se),
    "mean_max_prob": jnp.mean(jnp.max(probs_se, axis=-1)),
    "mean_norm": jnp.mean(norm_se),
  }
  losses = {"load_balance_loss": aux_losses.load_balance_loss(probs_se, chosen_se)}
  return base.rank_major_routing(expert_sk, gate_sk, aux_losses=losses, metrics=metrics)


def chosen_activations(c_sem: jax.Array, routing: base.SparseRouting) -> jax.Array:
  """The cached c row of every pair: c[token_n, expert_n], [S, E, M] -> [N, M]."""
  return c_sem[routing.token_index, routing.expert_index]


def autonomy_expert_ffn(
  x_ecd: jax.Array,
  c_ecm: jax.Array,
  w_up_emf: jax.Array,
  w_p_edf: jax.Array,
  w_o_efd: jax.Array,
) -> jax.Array:
  """Expert e on its buffer, from the cached c: (SiLU(c W_up^e) * (x W_p^e)) W_o^e.

  Args:
    x_ecd: [E, C, D] tokens dispatched to each expert; the computation runs in this dtype.
    c_ecm: [E, C, M] their cached low-rank activations c = x W_down^e (same slots).
    w_up_emf: [E, M, F]; w_p_edf: [E, D, F]; w_o_efd: [E, F, D].

  Returns:
    [E, C, D] expert outputs in x's dtype.
  """
  dtype = x_ecd.dtype
  gate_ecf = jax.nn.silu(jnp.einsum("ecm,emf->ecf", c_ecm.astype(dtype), w_up_emf.astype(dtype)))
  value_ecf = jnp.einsum("ecd,edf->ecf", x_ecd, w_p_edf.astype(dtype))
  return jnp.einsum("ecf,efd->ecd", gate_ecf * value_ecf, w_o_efd.astype(dtype))


class LowRankGateExperts:
  """The AoE experts as the dispatches see them: `__call__(buf)` and `weights()` of an expert
  bank whose gate is SiLU(x W_down W_up) and whose value and output are the bank's w_in, w_out.

  Einsum letters: g groups, e experts, c slots, d d_model, m low rank, f expert hidden.
  """

  def __init__(self, w_down_edm, w_up_emf, experts):
    bank = experts.weights()
    if bank["w_gate"] is not None:
      raise ValueError(
        "the autonomy router builds its own SiLU gate: use model.activation='gelu' or 'relu' "
        "(a 'swiglu' bank's gate branch would go unused)"
      )
    self.w_down, self.w_up = w_down_edm, w_up_emf
    self.w_p, self.w_o = bank["w_in"], bank["w_out"]

  def __call__(self, buf_gecd):
    """[G, E, C, D] dispatched tokens -> [G, E, C, D]: expert e on buffer e, low rank first."""
    dtype = buf_gecd.dtype
    c_gecm = jnp.einsum("gecd,edm->gecm", buf_gecd, self.w_down.astype(dtype))
    gate = jax.nn.silu(jnp.einsum("gecm,emf->gecf", c_gecm, self.w_up.astype(dtype)))
    value = jnp.einsum("gecd,edf->gecf", buf_gecd, self.w_p.astype(dtype))
    return jnp.einsum("gecf,efd->gecd", gate * value, self.w_o.astype(dtype))

  def weights(self) -> dict:
    """Grouped-matmul form: SiLU(x @ (W_down W_up)) * (x @ W_p) @ W_o."""
    gate_edf = jnp.einsum("edm,emf->edf", self.w_down, self.w_up)
    return {"w_in": gate_edf, "w_gate": self.w_p, "w_out": self.w_o, "activation": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class AutonomyOptions(base.RouterOptions):
  """Options of the `autonomy` family (`model.moe.autonomy.*`).

  model.moe.d_expert (F) must be set: W_up is [E, M, F].

  Attributes:
    d_low: M, the rank of the factorised gate (the experts score themselves by ||x W_down||).
    normalize: renormalise each token's k gates to sum 1 (the earlier reference code).
    init_std: standard deviation of the W_down and W_up inits (the code's 0.02).
    load_balance_loss_weight: weight of the Switch balance loss on softmax(norms).
  """

  d_low: int = base.option(32, ge=1)
  normalize: bool = False
  init_std: float = 0.02
  load_balance_loss_weight: float = 1e-2


@registry.register("autonomy")
class AutonomyRouter(base.TokenChoiceRouter):
  """Autonomy-of-Experts: experts chosen by the norms of their own low-rank activations."""

  Options = AutonomyOptions
  AUX_LOSSES = ("load_balance_loss",)

  @classmethod
  def check(cls, options: AutonomyOptions, moe: base.MoESettings) -> None:
    if moe.d_expert is None:
      raise errors.ConfigError(
        "model.moe.d_expert=None: the autonomy router's W_up is [E, d_low, d_expert]; set "
        "model.moe.d_expert (configs/autonomy.py shrinks it to keep the baseline's parameters)"
      )

  def __init__(
    self, *, d_model: int, moe: base.MoESettings, options: AutonomyOptions, rngs: nnx.Rngs
  ):
    """Builds W_down [E, D, M] and W_up [E, M, F], normal(init_std), sharded like experts."""
    self.check(options, moe)
    base.check_top_k(moe.top_k, moe.num_experts)
    self.num_experts, self.top_k, self.options = moe.num_experts, moe.top_k, options
    init = jax.nn.initializers.normal(stddev=options.init_std)
    shape_down = (moe.num_experts, d_model, options.d_low)
    shape_up = (moe.num_experts, options.d_low, moe.d_expert)
    self.w_down = nnx.Param(init(rngs.params(), shape_down), axes=("expert", "expert_embed", None))
    self.w_up = nnx.Param(init(rngs.params(), shape_up), axes=("expert", None, "expert_mlp"))

  def __call__(self, x_gsd: jax.Array, *, train: bool, rng=None) -> base.SparseRouting:
    """Routes every group by the norms of x W_down^e (float32; train and eval alike).

    Returns:
      SparseRouting with [G, N] array fields (N = S*k) and group-averaged losses and metrics.
    """
    del train, rng
    w_down = self.w_down[...].astype(jnp.float32)
    route = lambda x_sd: route_autonomy(
      low_rank_activations(x_sd.astype(jnp.float32), w_down),
      top_k=self.top_k,
      normalize=self.options.normalize,
    )
    return base.route_groups(route, x_gsd)

  def dispatch_experts(self, experts) -> LowRankGateExperts:
    return LowRankGateExperts(self.w_down[...], self.w_up[...], experts)
