"""Autonomy-of-Experts: routing by the norms of the experts' own activations, cached expert FFN;
the `autonomy` router through the MoE layer with every dispatch."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model.routers import autonomy
from moejax.model.transformer import Transformer
from moejax.ops import capacity
from tests.family_configs import family_config

route = jax.jit(autonomy.route_autonomy, static_argnames=("top_k", "normalize"))


def c_with_norms(norms_se):
  """c [S, E, M=2] whose rows have the given L2 norms: [n, 0]."""
  norms = np.asarray(norms_se, np.float32)
  return jnp.asarray(np.stack([norms, np.zeros_like(norms)], axis=-1))


# Norms chosen so that p = softmax(norms) is a round distribution: norms ln(w) give p = w / sum.
WEIGHTS = [
  [2, 3, 5],  # p = [.2, .3, .5]
  [6, 3, 1],  # p = [.6, .3, .1]
  [1, 8, 1],  # p = [.1, .8, .1]
  [4, 4, 2],  # p = [.4, .4, .2]
]


def test_hand_case_top1_and_balance_loss():
  routing = route(c_with_norms(np.log(WEIGHTS)), top_k=1)
  # Top-1: t0 -> e2 (.5), t1 -> e0 (.6), t2 -> e1 (.8), t3 -> e0 (.4, tie with e1: lower index).
  np.testing.assert_array_equal(routing.expert_index, [2, 0, 1, 0])
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3])
  np.testing.assert_allclose(routing.combine_weight, [0.5, 0.6, 0.8, 0.4], rtol=1e-5)
  # f = [2, 1, 1] / 4; P = [.2+.6+.1+.4, .3+.3+.8+.4, .5+.1+.1+.2] / 4 = [1.3, 1.8, .9] / 4
  # loss = 3 * (2*1.3 + 1*1.8 + 1*.9) / 16 = 3 * 5.3 / 16 = 0.99375
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], 0.99375, rtol=1e-5)
  np.testing.assert_allclose(routing.metrics["expert_load"], [0.5, 0.25, 0.25])
  # mean max p = (.5 + .6 + .8 + .4) / 4 = .575
  np.testing.assert_allclose(routing.metrics["mean_max_prob"], 0.575, rtol=1e-5)
  np.testing.assert_allclose(routing.metrics["mean_norm"], np.mean(np.log(WEIGHTS)), rtol=1e-5)


def reference_routing(c_sem, top_k, normalize):
  """Per token: L2 norm of each expert's c, softmax, python sort; choice-rank-major pairs."""
  c = np.asarray(c_sem, np.float64)
  norms = np.sqrt(np.sum(c * c, axis=-1))
  probs = np.exp(norms - norms.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  tokens, experts, gates = [], [], []
  for rank in range(top_k):
    for s, row in enumerate(probs.tolist()):
      order = sorted(range(len(row)), key=lambda e, row=row: -row[e])
      total = sum(row[e] for e in order[:top_k]) if normalize else 1.0
      tokens.append(s)
      experts.append(order[rank])
      gates.append(row[order[rank]] / total)
  return np.array(tokens), np.array(experts), np.array(gates), probs


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, False), (3, True)])
def test_routing_matches_reference(top_k, normalize):
  rng = np.random.default_rng(top_k)
  num_tokens, num_experts = 7, 5
  c = jnp.asarray(rng.normal(size=(num_tokens, num_experts, 3)), jnp.float32)
  routing = route(c, top_k=top_k, normalize=normalize)
  tokens, experts, gates, probs = reference_routing(c, top_k, normalize)
  np.testing.assert_array_equal(routing.token_index, tokens)
  np.testing.assert_array_equal(routing.expert_index, experts)
  np.testing.assert_allclose(routing.combine_weight, gates, rtol=1e-5)
  mask = np.zeros((num_tokens, num_experts))
  mask[tokens, experts] = 1.0
  balance = num_experts * np.sum(mask.mean(0) * probs.mean(0))
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], balance, rtol=1e-5)


def test_cached_expert_path_equals_per_token_loop():
  """Route on c = x W_down, dispatch (x, cached c) pairs, run the experts, combine; versus a
  per-token loop that recomputes each chosen expert from W_down = the factorised SwiGLU."""
  rng = np.random.default_rng(0)
  num_tokens, num_experts, dim, low, hidden, top_k = 6, 4, 5, 3, 7, 2
  w = lambda *shape: jnp.asarray(rng.normal(size=shape) / math.sqrt(shape[-2]), jnp.float32)
  x = jnp.asarray(rng.normal(size=(num_tokens, dim)), jnp.float32)
  w_down, w_up = w(num_experts, dim, low), w(num_experts, low, hidden)
  w_p, w_o = w(num_experts, dim, hidden), w(num_experts, hidden, dim)

  @jax.jit
  def layer(x, w_down, w_up, w_p, w_o):
    c_sem = autonomy.low_rank_activations(x, w_down)
    routing = autonomy.route_autonomy(c_sem, top_k=top_k)
    c_nm = autonomy.chosen_activations(c_sem, routing)
    cap = num_tokens  # no drops
    slot, kept = capacity.compute_slots(routing.expert_index, routing.valid, num_experts, cap)
    x_ecd = capacity.dispatch(
      x, routing.token_index, routing.expert_index, slot, kept, num_experts, cap
    )
    pair_n = jnp.arange(routing.num_pairs)
    c_ecm = capacity.dispatch(c_nm, pair_n, routing.expert_index, slot, kept, num_experts, cap)
    y_ecd = autonomy.autonomy_expert_ffn(x_ecd, c_ecm, w_up, w_p, w_o)
    return capacity.combine(
      y_ecd,
      routing.token_index,
      routing.expert_index,
      slot,
      kept,
      routing.combine_weight,
      num_tokens,
    )

  y = layer(x, w_down, w_up, w_p, w_o)
  wd, wu, wp, wo = (np.asarray(a, np.float64) for a in (w_down, w_up, w_p, w_o))
  silu = lambda a: a / (1 + np.exp(-a))
  for s in range(num_tokens):
    xs = np.asarray(x[s], np.float64)
    norms = np.array([np.linalg.norm(xs @ wd[e]) for e in range(num_experts)])
    probs = np.exp(norms - norms.max()) / np.exp(norms - norms.max()).sum()
    expected = np.zeros(dim)
    for e in np.argsort(-probs)[:top_k]:
      expected += probs[e] * ((silu(xs @ wd[e] @ wu[e]) * (xs @ wp[e])) @ wo[e])
    np.testing.assert_allclose(y[s], expected, rtol=1e-4, atol=1e-6)


def test_gradient_reaches_w_down_through_the_gate_and_the_expert():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  w_down = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  x_ecd = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)
  w_up, w_p = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(3, 2, 6), (3, 4, 6)])
  w_o = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)

  def gate_loss(w_down):
    r = autonomy.route_autonomy(autonomy.low_rank_activations(x, w_down), top_k=2)
    return jnp.sum(r.combine_weight) + r.aux_losses["load_balance_loss"]

  def expert_loss(w_down):
    c_ecm = jnp.einsum("ecd,edm->ecm", x_ecd, w_down)
    return jnp.sum(autonomy.autonomy_expert_ffn(x_ecd, c_ecm, w_up, w_p, w_o))

  for loss in (gate_loss, expert_loss):
    g = jax.jit(jax.grad(loss))(w_down)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  # A zero activation has a finite norm gradient (the 1e-12 inside the square root).
  zero = jax.grad(lambda c: jnp.sum(autonomy.route_autonomy(c, top_k=1).combine_weight))(
    jnp.zeros((2, 3, 2))
  )
  assert bool(jnp.all(jnp.isfinite(zero)))


def test_vmap_over_groups_and_normalized_weights():
  c_gsem = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 4, 2)), jnp.float32)
  fn = functools.partial(autonomy.route_autonomy, top_k=2, normalize=True)
  batched = jax.jit(jax.vmap(fn))(c_gsem)
  for g in range(3):
    single = route(c_gsem[g], top_k=2, normalize=True)
    np.testing.assert_array_equal(batched.expert_index[g], single.expert_index)
    np.testing.assert_allclose(batched.combine_weight[g], single.combine_weight, rtol=1e-6)
  weight_ks = np.asarray(batched.combine_weight[0]).reshape(2, 5)
  np.testing.assert_allclose(weight_ks.sum(0), 1.0, rtol=1e-6)


def test_rejects_too_many_choices():
  with pytest.raises(ValueError, match="top_k=4"):
    autonomy.route_autonomy(jnp.zeros((2, 3, 2)), top_k=4)


def _reference_layer(x_td, layer, top_k):
  """Per token in float64: norms ||x W_down^e||, p = softmax, the top-k experts, each
  p_e * (SiLU(x W_down^e W_up^e) * (x W_p^e)) W_o^e with W_p, W_o the bank's w_in, w_out."""
  w_down, w_up = (np.asarray(v[...], np.float64) for v in (layer.router.w_down, layer.router.w_up))
  w_p, w_o = (np.asarray(v[...], np.float64) for v in (layer.experts.w_in, layer.experts.w_out))
  y = np.zeros_like(x_td)
  for t, x in enumerate(x_td):
    norms = np.array([np.linalg.norm(x @ w_down[e]) for e in range(len(w_down))])
    p = np.exp(norms - norms.max()) / np.exp(norms - norms.max()).sum()
    for e in np.argsort(-p, kind="stable")[:top_k]:
      gate = np.asarray(jax.nn.silu(jnp.asarray(x @ w_down[e] @ w_up[e])), np.float64)
      y[t] += p[e] * ((gate * (x @ w_p[e])) @ w_o[e])
  return y


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_equals_per_token_reference_with_every_dispatch(top_k):
  x = jax.random.normal(jax.random.key(0), (4, 32, 64))
  outputs = {}
  for dispatch in ("capacity", "dropless", "all_to_all"):
    cfg = family_config("autonomy")
    cfg.model.moe.top_k, cfg.model.moe.dispatch = top_k, dispatch
    cfg.model.moe.eval_capacity_factor = 4.0  # C = S * k: nothing dropped
    cfg.model.moe.autonomy.init_std = 0.2  # decisive norms
    layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
    y, losses, metrics = layer(x, train=False, rng=None)
    assert float(metrics["dropped_fraction"]) == 0.0 and "load_balance_loss" in losses
    assert float(metrics["mean_max_prob"]) > 0.4  # routing far from uniform (0.25)
    outputs[dispatch] = np.asarray(y).reshape(-1, 64)
  expected = _reference_layer(np.asarray(x, np.float64).reshape(-1, 64), layer, top_k)
  for dispatch, y in outputs.items():
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=2e-4, err_msg=dispatch)


def test_gradient_reaches_w_down_through_routing_and_experts():
  cfg = family_config("autonomy")
  layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
  x = jax.random.normal(jax.random.key(0), (2, 32, 64))

  x_gsd = layer.to_groups(x)

  def loss(w_down, through_routing):
    # The router's routing and dispatch experts, as functions of w_down.
    route = lambda x_sd: autonomy.route_autonomy(
      autonomy.low_rank_activations(x_sd, w_down), top_k=1
    )
    routing = jax.vmap(route)(x_gsd)
    if not through_routing:
      routing = jax.tree.map(jax.lax.stop_gradient, routing)
    experts = autonomy.LowRankGateExperts(w_down, layer.router.w_up[...], layer.experts)
    y, _ = capacity.capacity_moe(x_gsd, routing, experts, num_experts=4, capacity=64)
    return jnp.sum(y**2)

  w_down = layer.router.w_down[...]
  both = jax.grad(loss)(w_down, True)
  experts_only = jax.grad(loss)(w_down, False)
  assert np.all(np.isfinite(both)) and float(jnp.abs(experts_only).max()) > 0
  # The gate p adds its own part (relative to the gradient's scale).
  assert float(jnp.abs(both - experts_only).max()) > 1e-2 * float(jnp.abs(both).max())


def test_swiglu_bank_is_refused():
  cfg = family_config("autonomy")
  cfg.model.activation = "swiglu"
  layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
  with pytest.raises(ValueError, match="model.activation='gelu' or 'relu'"):
    layer(jnp.zeros((2, 32, 64)), train=False, rng=None)
