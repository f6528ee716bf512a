"""MoE-X: the wide-MLP view z_hat of an MoE layer, and the sparsity-aware `moex` router."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from moejax.model import routers
from moejax.model.experts import ExpertBank
from moejax.model.moe_layer import MoELayer
from moejax.model.routers import base, moex
from moejax.proj.moex import wide

E, D, F, B, L = 4, 16, 8, 4, 8


def make_layer(router_name, dispatch, top_k, activation="relu", capacity_factor=0.6):
  rngs = nnx.Rngs(0)
  settings = base.MoESettings(
    num_experts=E,
    top_k=top_k,
    group_size=16,
    dispatch=dispatch,
    capacity_factor=capacity_factor,
    eval_capacity_factor=capacity_factor,
  )
  router = routers.get(router_name).make(d_model=D, rngs=rngs, init_std=0.5, **vars(settings))
  experts = ExpertBank(E, D, F, activation=activation, init_std=0.3, out_std=0.3, rngs=rngs)
  return MoELayer(router=router, experts=experts, settings=settings)


@nnx.jit
def forward_with_hidden(layer, x):
  y, _, metrics = layer(x, train=False, rng=None)
  return y, wide.moe_hidden_code(layer, x, train=False), metrics


@pytest.mark.parametrize(
  "router_name,dispatch,top_k,activation",
  [
    ("switch", "capacity", 1, "relu"),
    ("top_k", "dropless", 2, "gelu"),
    ("moex", "capacity", 2, "relu"),
    ("moex", "dropless", 2, "swiglu"),
  ],
)
def test_stacked_wide_mlp_reproduces_moe_output(router_name, dispatch, top_k, activation):
  layer = make_layer(router_name, dispatch, top_k, activation)
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  y, z, metrics = forward_with_hidden(layer, x)
  assert z.shape == (B, L, E * F)
  y_wide = jnp.einsum("blk,kd->bld", z, wide.stacked_decoder(layer.experts))
  np.testing.assert_allclose(np.asarray(y_wide), np.asarray(y), atol=1e-5)
  # Block e of z_hat is zero for experts the token did not reach: at most k blocks are nonzero.
  blocks_used = np.asarray(jnp.any(z.reshape(B, L, E, F) != 0, axis=-1)).sum(-1)
  assert blocks_used.max() <= top_k
  if dispatch == "capacity":  # capacity 0.6 drops some pairs; their code must vanish too
    assert float(metrics["dropped_fraction"]) > 0


def test_z_hat_of_a_token_is_gate_times_expert_hidden():
  """Brute force for one token: z_hat block e = (sum of its gates for e) * act(x W_in^e)."""
  layer = make_layer("moex", "dropless", 2)
  x = jax.random.normal(jax.random.key(2), (B, L, D))
  _, z, _ = forward_with_hidden(layer, x)
  xs = np.asarray(x[1, 3], np.float64)
  w_in = np.asarray(layer.experts.w_in[...], np.float64)
  mu, var = w_in.mean(-1), w_in.var(-1)
  phi = stats.norm.cdf((mu @ xs) / np.sqrt(var @ (xs * xs) + 1e-8))
  chosen = np.argsort(phi)[:2]  # the two sparsest
  gates = np.exp(-phi[chosen]) / np.exp(-phi[chosen]).sum()
  want = np.zeros((E, F))
  for e, gate in zip(chosen, gates, strict=True):
    want[e] = gate * np.maximum(xs @ w_in[e], 0)
  np.testing.assert_allclose(np.asarray(z[1, 3]).reshape(E, F), want, atol=1e-5)


def random_experts_with_varied_sparsity(key, num_experts=8, d=32, f=256):
  """Gaussian encoders whose per-input mean differs by expert, so experts differ in sparsity."""
  k1, k2, k3 = jax.random.split(key, 3)
  shift_ed = jax.random.normal(k1, (num_experts, d)) * 0.5
  scale_e = jax.random.uniform(k2, (num_experts,), minval=0.5, maxval=1.5)
  noise = jax.random.normal(k3, (num_experts, d, f))
  return shift_ed[..., None] + scale_e[:, None, None] * noise


def test_score_is_strongly_anticorrelated_with_true_l0():
  @jax.jit
  def score_l0_corr(key):
    w_in = random_experts_with_varied_sparsity(key)
    x = jax.random.normal(jax.random.key(1), (256, 32))
    mu, var = moex.expert_column_stats(w_in)
    score = -moex.positive_fraction_estimate(x, mu, var)
    l0 = moex.true_positive_fraction(x, w_in)
    return score, l0, moex.rank_correlation(score, l0)

  score, l0, corr = score_l0_corr(jax.random.key(0))
  score, l0, corr = np.asarray(score), np.asarray(l0), float(corr)
  # Reference: scipy's Spearman per token, averaged.
  want = np.mean([stats.spearmanr(s, t).statistic for s, t in zip(score, l0, strict=True)])
  assert abs(corr - want) < 0.02
  assert corr < -0.5, corr
  # The estimate itself tracks the measured fraction.
  assert float(np.mean(np.abs(-score - l0))) < 0.05


def test_routing_picks_the_sparsest_experts_on_a_hand_built_case():
  """Expert e's encoder columns all equal c_e * x_dir: for x along x_dir, expert e's neurons are
  all positive when c_e > 0 and all off when c_e < 0; the two most negative c_e must win."""
  d, f = 4, 6
  c_e = jnp.array([0.5, -2.0, 1.0, -0.5])
  x_dir = jnp.array([1.0, 0.0, 0.0, 0.0])
  noise = 0.01 * jax.random.normal(jax.random.key(0), (4, d, f))
  w_in = c_e[:, None, None] * x_dir[None, :, None] + noise
  rngs = nnx.Rngs(0)
  router = moex.MoEXRouter.make(d_model=d, num_experts=4, top_k=2, rngs=rngs)
  bank = ExpertBank(4, d, f, activation="relu", init_std=0.1, out_std=0.1, rngs=rngs)
  bank.w_in[...] = w_in
  routing = nnx.jit(lambda r, b: r(x_dir.reshape(1, 1, d), train=False, experts=b))(router, bank)
  assert sorted(np.asarray(routing.expert_index[0]).tolist()) == [1, 3]
  assert float(routing.metrics["score_l0_rank_corr"]) < -0.5
  np.testing.assert_allclose(float(jnp.sum(routing.combine_weight)), 1.0, rtol=1e-6)


def test_moex_options_stop_gradient_and_loss_weight():
  w_in = random_experts_with_varied_sparsity(jax.random.key(3), 4, 8, 16)
  x = jax.random.normal(jax.random.key(4), (1, 16, 8))

  def grad_wrt_w_in(stop):
    rngs = nnx.Rngs(0)
    router = moex.MoEXRouter.make(
      d_model=8, num_experts=4, top_k=2, rngs=rngs, stop_gradient_stats=stop
    )
    loss = lambda w: jnp.sum(router.scores(x, w) ** 2)
    return jax.jit(jax.grad(loss))(w_in)

  assert float(jnp.abs(grad_wrt_w_in(False)).sum()) > 0
  assert float(jnp.abs(grad_wrt_w_in(True)).sum()) == 0
  rngs = nnx.Rngs(0)
  bank = ExpertBank(4, 8, 16, activation="relu", init_std=0.1, out_std=0.1, rngs=rngs)
  router = moex.MoEXRouter.make(d_model=8, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  call = nnx.jit(lambda r, b: r(x, train=True, experts=b).aux_losses["load_balance_loss"])
  # The loss is returned unweighted (>= k at balance); its weight is an option, 0 by default.
  assert float(call(router, bank)) >= 2 - 1e-6
  assert moex.MoEXRouter.loss_weights(router.options) == {"load_balance_loss": 0.0}
  weighted = moex.MoEXOptions(load_balance_loss_weight=2.0)
  assert moex.MoEXRouter.loss_weights(weighted) == {"load_balance_loss": 2.0}
