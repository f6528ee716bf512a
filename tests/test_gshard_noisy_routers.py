"""GShard top-2 (random routing) and noisy top-k gating: routing, losses, capacity, modules."""

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, errors, train
from moejax import metrics as metrics_lib
from moejax.model import routers
from moejax.model.routers import base, gshard_top2, noisy_top_k
from moejax.ops import capacity
from tests.helpers import tiny_config, write_corpus

# Jitted once per shape: on CPU, one compile beats compiling every primitive eagerly.
route_gshard = jax.jit(gshard_top2.route_gshard_top2, static_argnames=("second_expert_policy",))
route_noisy = jax.jit(noisy_top_k.route_noisy_top_k, static_argnames=("top_k",))


@functools.partial(nnx.jit, static_argnames=("train",))
def call_router(router, x, rng, train):
  return router(x, train=train, rng=rng)


def scaled_experts(buf_gecd):
  """Expert e multiplies its tokens by e + 1: f_e(x) = (e + 1) x."""
  scale_e = jnp.arange(1, buf_gecd.shape[1] + 1, dtype=buf_gecd.dtype)
  return buf_gecd * scale_e[None, :, None, None]


@functools.partial(jax.jit, static_argnames=("num_experts", "cap"))
def run_capacity_moe(x_gsd, routing, num_experts, cap):
  return capacity.capacity_moe(
    x_gsd, routing, scaled_experts, num_experts=num_experts, capacity=cap
  )


def reference_capacity_moe(x_sd, pairs, num_experts, cap):
  """Python loop: pairs (token, expert, weight) claim slots in order while the expert has room."""
  counts = [0] * num_experts
  y = np.zeros_like(x_sd)
  for s, e, w in pairs:
    if counts[e] < cap:
      y[s] += w * (e + 1) * x_sd[s]
    counts[e] += 1
  return y


def phi(z):
  """Standard normal CDF without scipy."""
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def softmax(logits):
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def cv2(values):
  values = np.asarray(values, np.float64)
  return values.var() / (values.mean() ** 2 + 1e-10)


# Four tokens, four experts; every row sums to 1, so softmax(log(probs) + 1) == probs and the
# logsumexp of every row is exactly 1.
PROBS = np.array(
  [
    [0.50, 0.30, 0.10, 0.10],  # e1 = 0, e2 = 1; g = 0.5/0.8, 0.3/0.8 = 0.625, 0.375
    [0.10, 0.60, 0.20, 0.10],  # e1 = 1, e2 = 2; g = 0.6/0.8, 0.2/0.8 = 0.75, 0.25
    [0.45, 0.35, 0.10, 0.10],  # e1 = 0, e2 = 1; g = 0.45/0.8, 0.35/0.8 = 0.5625, 0.4375
    [0.10, 0.10, 0.50, 0.30],  # e1 = 2, e2 = 3; g = 0.5/0.8, 0.3/0.8 = 0.625, 0.375
  ],
  np.float32,
)
LOGITS = np.log(PROBS) + 1.0

# ==============================================================================================
# GShard top-2


@pytest.mark.parametrize(
  "num_tokens, num_experts, cf, expected",
  [
    (16, 8, 1.25, 5),  # 2 * ceil(16/8) * 1.25 = 2 * 2 * 1.25 = 5
    (10, 4, 1.0, 6),  # 2 * ceil(2.5) * 1 = 2 * 3 = 6
    (4, 4, 0.5, 1),  # 2 * 1 * 0.5 = 1
    (10, 2, 1.1, 11),  # 2 * 5 * 1.1 = 11.000000000000002 in floats, still 11
    (4, 64, 0.1, 1),  # 2 * 1 * 0.1 = 0.2 -> at least 1
  ],
)
def test_gshard_capacity(num_tokens, num_experts, cf, expected):
  c = gshard_top2.gshard_capacity(num_tokens, num_experts, cf)
  assert c == expected and isinstance(c, int)


def test_gshard_hand_case_eval():
  routing = route_gshard(jnp.asarray(LOGITS))  # no rng: every second choice is kept
  # Pairs 0..3: first choices in token order; pairs 4..7: second choices.
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(routing.expert_index, [0, 1, 0, 2, 1, 2, 1, 3])
  np.testing.assert_allclose(
    routing.combine_weight,
    [0.625, 0.75, 0.5625, 0.625, 0.375, 0.25, 0.4375, 0.375],
    rtol=1e-6,
  )
  assert bool(jnp.all(routing.valid))
  # m = column means of PROBS = [1.15, 1.35, 0.9, 0.6] / 4
  # c = FIRST choices per expert / S = [2, 1, 1, 0] / 4 (the second choices do not count)
  # loss = E * sum m c = 4 * (2 * 1.15 + 1.35 + 0.9) / 16 = 4.55 / 4 = 1.1375
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], 1.1375, rtol=1e-6)
  # logsumexp(log PROBS + 1) = 1 for every token: z-loss = mean(1^2) = 1.
  np.testing.assert_allclose(routing.aux_losses["router_z_loss"], 1.0, rtol=1e-6)
  # Valid pairs per expert: e0 {t0, t2}, e1 {t1, t0, t2}, e2 {t3, t1}, e3 {t3} -> [2, 3, 2, 1] / 8
  np.testing.assert_allclose(routing.metrics["expert_load"], [0.25, 0.375, 0.25, 0.125])
  np.testing.assert_allclose(routing.metrics["second_kept_fraction"], 1.0)
  entropy = np.mean(-np.sum(PROBS * np.log(PROBS), axis=-1))
  np.testing.assert_allclose(routing.metrics["router_entropy"], entropy, rtol=1e-5)


def test_gshard_random_routing_matches_numpy_keep_rule():
  rng = np.random.default_rng(0)
  num_tokens, num_experts = 64, 6
  logits = rng.normal(scale=1.5, size=(num_tokens, num_experts)).astype(np.float32)
  key = jax.random.key(42)
  routing = route_gshard(jnp.asarray(logits), rng=key)
  # Reference: a python sort per token, renormalised gates, keep e2 iff 2 * g2 > u.
  probs = softmax(logits.astype(np.float64))
  u = np.asarray(jax.random.uniform(key, (num_tokens,), jnp.float32))
  first, second, g1, g2, keep = [], [], [], [], []
  for s in range(num_tokens):
    order = sorted(range(num_experts), key=lambda e, s=s: -probs[s, e])
    p1, p2 = probs[s, order[0]], probs[s, order[1]]
    first.append(order[0])
    second.append(order[1])
    g1.append(p1 / (p1 + p2))
    g2.append(p2 / (p1 + p2))
    keep.append(2 * g2[-1] > u[s])
  keep = np.array(keep)
  assert 0 < keep.sum() < num_tokens  # both outcomes occur, so the rule is really tested
  np.testing.assert_array_equal(routing.expert_index, first + second)
  np.testing.assert_array_equal(routing.valid, np.concatenate([np.ones(num_tokens, bool), keep]))
  # A skipped second choice has weight 0; the first gate stays g1 (not renormalised to 1).
  np.testing.assert_allclose(
    routing.combine_weight, np.concatenate([g1, np.where(keep, g2, 0.0)]), rtol=1e-5
  )
  np.testing.assert_allclose(routing.metrics["second_kept_fraction"], keep.mean(), rtol=1e-6)
  claims = np.bincount(first + list(np.array(second)[keep]), minlength=num_experts)
  np.testing.assert_allclose(routing.metrics["expert_load"], claims / claims.sum(), rtol=1e-6)
  # The aux loss counts first choices only, so random routing leaves it unchanged.
  lb = num_experts * np.sum(np.bincount(first, minlength=num_experts) / num_tokens * probs.mean(0))
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], lb, rtol=1e-5)
  # Policy "all" keeps every second choice even with a key.
  everything = route_gshard(jnp.asarray(logits), rng=key, second_expert_policy="all")
  assert bool(jnp.all(everything.valid))
  np.testing.assert_allclose(everything.combine_weight, np.concatenate([g1, g2]), rtol=1e-5)


def test_gshard_capacity_first_choices_fill_first_and_dropped_are_zero():
  # S=4, E=4, capacity_factor 0.5: C = 2 * ceil(4/4) * 0.5 = 1 slot per expert.
  cap = gshard_top2.gshard_capacity(4, 4, 0.5)
  assert cap == 1
  routing = route_gshard(jnp.asarray(LOGITS))
  # Pairs [t0:e0, t1:e1, t2:e0, t3:e2 | t0:e1, t1:e2, t2:e1, t3:e3] claim in order:
  #   t0:e0 slot 0 kept     t1:e1 slot 0 kept     t2:e0 dropped (e0 full)  t3:e2 slot 0 kept
  #   t0:e1 dropped: the LATER token 1's first choice took e1 (not causal in a sequence)
  #   t1:e2 dropped (t3's first choice)   t2:e1 dropped   t3:e3 slot 0 kept
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)), jnp.float32)
  routing_g = jax.tree.map(lambda a: a[None], routing)
  y, stats = run_capacity_moe(x, routing_g, 4, cap)
  # f_e(x) = (e + 1) x:  t0 = 0.625 * 1 x0;  t1 = 0.75 * 2 x1;  t2: both pairs dropped -> 0;
  # t3 = 0.625 * 3 x3 + 0.375 * 4 x3 = 3.375 x3.
  expected = np.asarray(x[0]) * np.array([0.625, 1.5, 0.0, 3.375])[:, None]
  np.testing.assert_allclose(y[0], expected, rtol=1e-6)
  np.testing.assert_array_equal(y[0, 2], 0.0)
  np.testing.assert_allclose(stats["dropped_fraction"], 4 / 8)


def test_gshard_capacity_matches_loop_with_random_routing():
  rng = np.random.default_rng(2)
  num_tokens, num_experts = 16, 4
  logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  routing = route_gshard(jnp.asarray(logits), rng=jax.random.key(5))
  cap = gshard_top2.gshard_capacity(num_tokens, num_experts, 0.75)  # 2 * 4 * 0.75 = 6
  x = rng.normal(size=(num_tokens, 3)).astype(np.float32)
  y, _ = run_capacity_moe(jnp.asarray(x)[None], jax.tree.map(lambda a: a[None], routing), 4, cap)
  pairs = [
    (int(s), int(e), float(w))
    for s, e, w, v in zip(
      routing.token_index, routing.expert_index, routing.combine_weight, routing.valid, strict=True
    )
    if v  # a skipped second choice claims nothing
  ]
  np.testing.assert_allclose(y[0], reference_capacity_moe(x, pairs, num_experts, cap), rtol=1e-5)


def test_gshard_permutation_equivariance():
  rng = np.random.default_rng(3)
  num_tokens = 8
  logits = rng.normal(size=(num_tokens, 5)).astype(np.float32)
  perm = rng.permutation(num_tokens)
  a = route_gshard(jnp.asarray(logits))
  b = route_gshard(jnp.asarray(logits[perm]))
  # Token s of the permuted group is token perm[s] of the original, in both choice ranks.
  for rank in range(2):
    sl = slice(rank * num_tokens, (rank + 1) * num_tokens)
    np.testing.assert_array_equal(b.expert_index[sl], np.asarray(a.expert_index[sl])[perm])
    np.testing.assert_allclose(b.combine_weight[sl], np.asarray(a.combine_weight[sl])[perm])
  for name in ("load_balance_loss", "router_z_loss"):
    np.testing.assert_allclose(b.aux_losses[name], a.aux_losses[name], rtol=1e-6)


def make_gshard(**kwargs):
  args = dict(d_model=16, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  return gshard_top2.GShardTop2Router.make(**(args | kwargs))


def test_gshard_router_module_routes_each_group_with_its_own_key():
  router = make_gshard()
  assert router.kernel.axes == ("embed", None) and router.kernel.shape == (16, 4)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 16)), jnp.float32)
  key = jax.random.key(7)
  routing = call_router(router, x, key, True)
  assert routing.expert_index.shape == (2, 16) and routing.valid.shape == (2, 16)
  assert routing.metrics["expert_load"].shape == (4,)
  logits = jnp.einsum("gsd,de->gse", x, router.kernel[...], precision="highest")
  keys = jax.random.split(key, 2)
  for g in range(2):
    expected = route_gshard(logits[g], rng=keys[g])
    np.testing.assert_array_equal(routing.expert_index[g], expected.expert_index)
    np.testing.assert_array_equal(routing.valid[g], expected.valid)
  # Evaluation keeps every second choice and needs no key.
  assert bool(jnp.all(call_router(router, x, None, False).valid))
  with pytest.raises(ValueError, match="rng"):
    router(x, train=True, rng=None)


def test_gshard_rejects_bad_options():
  with pytest.raises(ValueError, match="top_k=1"):
    make_gshard(top_k=1)
  cls, options = gshard_top2.GShardTop2Router, gshard_top2.GShardOptions()
  with pytest.raises(errors.ConfigError, match="model.moe.top_k=3"):
    cls.check(options, base.MoESettings(num_experts=4, top_k=3, group_size=8))
  with pytest.raises(ValueError, match="second_expert_policy='sampling'"):
    make_gshard(second_expert_policy="sampling")
  assert cls.causal_in_sequence(options, base.MoESettings(4, 2, 8, dispatch="dropless")) is False
  assert make_gshard().capacity(16, 1.25) == 10  # 2 * ceil(16/4) * 1.25


def test_gshard_gradients_reach_the_kernel():
  router = make_gshard()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 16)), jnp.float32)
  coeff = jnp.asarray(np.random.default_rng(6).normal(size=(2, 16)), jnp.float32)

  @nnx.jit
  def grads(router):
    def loss(router):
      r = router(x, train=True, rng=jax.random.key(0))
      return jnp.sum(coeff * r.combine_weight) + sum(r.aux_losses.values())

    return nnx.grad(loss)(router)

  g = grads(router).kernel[...]
  assert g.shape == (16, 4) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


# ==============================================================================================
# Noisy top-k


def test_cv_squared_hand_case():
  # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5, CV^2 = 3.5 / 9
  np.testing.assert_allclose(noisy_top_k.cv_squared(jnp.array([1.0, 2.0, 3.0, 6.0])), 3.5 / 9)
  np.testing.assert_allclose(noisy_top_k.cv_squared(jnp.array([2.0, 2.0, 2.0])), 0.0)
  np.testing.assert_allclose(noisy_top_k.cv_squared(jnp.array([5.0])), 0.0)


def test_noisy_hand_case_eval():
  ln3 = math.log(3.0)
  clean = jnp.array(
    [
      [ln3, 0.0, -1.0, -1.0],  # e0, e1; softmax([ln3, 0]) = [0.75, 0.25]
      [-1.0, 1.0, 1.0 + ln3, -2.0],  # e2, e1; [0.75, 0.25]
      [0.5, -1.0, -1.0, 0.5],  # tie: the lower index first, e0 then e3; [0.5, 0.5]
    ]
  )
  routing = route_noisy(clean, jnp.ones_like(clean), top_k=2)  # no rng: no noise
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(routing.expert_index, [0, 2, 0, 1, 1, 3])
  np.testing.assert_allclose(routing.combine_weight, [0.75, 0.75, 0.5, 0.25, 0.25, 0.5], rtol=1e-6)
  assert bool(jnp.all(routing.valid))
  # Importance = [0.75 + 0.5, 0.25 + 0.25, 0.75, 0.5] = [1.25, 0.5, 0.75, 0.5], mean 0.75,
  # variance (0.25 + 0.0625 + 0 + 0.0625) / 4 = 0.09375, CV^2 = 0.09375 / 0.5625 = 1/6.
  np.testing.assert_allclose(routing.aux_losses["importance_loss"], 1 / 6, rtol=1e-5)
  # Eval load = choice counts [2, 2, 1, 1], mean 1.5, variance 0.25, CV^2 = 0.25 / 2.25 = 1/9.
  np.testing.assert_allclose(routing.aux_losses["load_loss"], 1 / 9, rtol=1e-5)
  np.testing.assert_allclose(routing.metrics["expert_load"], np.array([2, 2, 1, 1]) / 6)


def reference_noisy(clean, std, noise, k):
  """Python loops: sort each token's noisy logits; Load from the k-th best of the OTHER experts."""
  num_tokens, num_experts = clean.shape
  noisy = clean + noise * std
  tokens, experts, gates = [], [], []
  importance, load = np.zeros(num_experts), np.zeros(num_experts)
  choices = []
  for s in range(num_tokens):
    order = sorted(range(num_experts), key=lambda e, s=s: -noisy[s, e])[:k]
    z = np.exp(noisy[s, order] - noisy[s, order].max())
    choices.append((order, z / z.sum()))
    for e, g in zip(order, z / z.sum(), strict=True):
      importance[e] += g
    for e in range(num_experts):
      others = sorted((noisy[s, j] for j in range(num_experts) if j != e), reverse=True)
      load[e] += phi((clean[s, e] - others[k - 1]) / std[s, e]) if k < num_experts else 1.0
  for rank in range(k):
    for s, (order, gate) in enumerate(choices):
      tokens.append(s)
      experts.append(order[rank])
      gates.append(gate[rank])
  return np.array(tokens), np.array(experts), np.array(gates), importance, load


@pytest.mark.parametrize("k", [1, 2, 5])
def test_noisy_training_matches_brute_force(k):
  rng = np.random.default_rng(k)
  num_tokens, num_experts = 6, 5
  clean = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  std = (np.log1p(np.exp(rng.normal(size=(num_tokens, num_experts)))) + 0.01).astype(np.float32)
  key = jax.random.key(k)
  routing = route_noisy(jnp.asarray(clean), jnp.asarray(std), top_k=k, rng=key)
  noise = np.asarray(jax.random.normal(key, (num_tokens, num_experts), jnp.float32))
  tokens, experts, gates, importance, load = reference_noisy(
    clean.astype(np.float64), std.astype(np.float64), noise.astype(np.float64), k
  )
  np.testing.assert_array_equal(routing.token_index, tokens)
  np.testing.assert_array_equal(routing.expert_index, experts)
  np.testing.assert_allclose(routing.combine_weight, gates, rtol=1e-5)
  np.testing.assert_allclose(routing.aux_losses["importance_loss"], cv2(importance), atol=1e-6)
  np.testing.assert_allclose(routing.aux_losses["load_loss"], cv2(load), rtol=1e-4, atol=1e-7)
  if k < num_experts:  # the load is smooth, not a count
    assert not np.allclose(load, np.round(load))
  np.testing.assert_allclose(
    routing.metrics["expert_load"],
    np.bincount(experts, minlength=num_experts) / experts.size,
    rtol=1e-6,
  )


def test_noisy_permutation_equivariance():
  rng = np.random.default_rng(8)
  num_tokens, k = 8, 2
  clean = rng.normal(size=(num_tokens, 5)).astype(np.float32)
  std = np.ones_like(clean)
  perm = rng.permutation(num_tokens)
  a = route_noisy(jnp.asarray(clean), jnp.asarray(std), top_k=k)
  b = route_noisy(jnp.asarray(clean[perm]), jnp.asarray(std), top_k=k)
  for rank in range(k):
    sl = slice(rank * num_tokens, (rank + 1) * num_tokens)
    np.testing.assert_array_equal(b.expert_index[sl], np.asarray(a.expert_index[sl])[perm])
    np.testing.assert_allclose(b.combine_weight[sl], np.asarray(a.combine_weight[sl])[perm])
  for name in ("importance_loss", "load_loss"):
    np.testing.assert_allclose(b.aux_losses[name], a.aux_losses[name], rtol=1e-5)


def test_noisy_capacity_matches_loop():
  rng = np.random.default_rng(9)
  num_tokens, num_experts, k = 12, 4, 2
  clean = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  std = np.full_like(clean, 0.5)
  routing = route_noisy(jnp.asarray(clean), jnp.asarray(std), top_k=k, rng=jax.random.key(1))
  cap = capacity.token_choice_capacity(num_tokens, num_experts, k, 0.75)  # 0.75 * 24 / 4 = 4.5
  assert cap == 5
  x = rng.normal(size=(num_tokens, 3)).astype(np.float32)
  y, stats = run_capacity_moe(
    jnp.asarray(x)[None], jax.tree.map(lambda a: a[None], routing), num_experts, cap
  )
  pairs = list(
    zip(
      np.asarray(routing.token_index).tolist(),
      np.asarray(routing.expert_index).tolist(),
      np.asarray(routing.combine_weight).tolist(),
      strict=True,
    )
  )
  np.testing.assert_allclose(y[0], reference_capacity_moe(x, pairs, num_experts, cap), rtol=1e-5)
  assert float(stats["dropped_fraction"]) > 0  # 24 claims for 20 slots: something dropped


def make_noisy(**kwargs):
  args = dict(d_model=16, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  return noisy_top_k.NoisyTopKRouter.make(**(args | kwargs))


def test_noisy_zero_init_routes_validly():
  router = make_noisy()
  assert router.w_gate.axes == ("embed", None) and router.w_noise.axes == ("embed", None)
  np.testing.assert_array_equal(router.w_gate[...], 0.0)
  np.testing.assert_array_equal(router.w_noise[...], 0.0)
  x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 8, 16)), jnp.float32)
  # Eval: every logit is 0; ties go to the lowest indices, so each token gets e0 and e1, 1/2 each.
  ev = call_router(router, x, None, False)
  np.testing.assert_array_equal(ev.expert_index[:, :8], 0)
  np.testing.assert_array_equal(ev.expert_index[:, 8:], 1)
  np.testing.assert_allclose(ev.combine_weight, 0.5)
  np.testing.assert_allclose(ev.metrics["router_entropy"], math.log(4), rtol=1e-6)
  # Training: the noise (scale softplus(0) + 0.01) breaks the ties; choices stay distinct.
  tr = call_router(router, x, jax.random.key(0), True)
  first, second = np.asarray(tr.expert_index[:, :8]), np.asarray(tr.expert_index[:, 8:])
  assert np.all(first != second) and len(np.unique(first)) > 1
  np.testing.assert_allclose(np.asarray(tr.combine_weight).reshape(2, 2, 8).sum(1), 1.0, rtol=1e-6)


def test_noisy_router_module_matches_pure_function():
  router = make_noisy()
  rng = np.random.default_rng(11)
  router.w_gate[...] = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  router.w_noise[...] = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
  key = jax.random.key(3)
  routing = call_router(router, x, key, True)
  clean = jnp.einsum("gsd,de->gse", x, router.w_gate[...], precision="highest")
  std = jax.nn.softplus(jnp.einsum("gsd,de->gse", x, router.w_noise[...], precision="highest"))
  keys = jax.random.split(key, 2)
  losses = []
  for g in range(2):
    expected = route_noisy(clean[g], std[g] + 0.01, top_k=2, rng=keys[g])
    np.testing.assert_array_equal(routing.expert_index[g], expected.expert_index)
    np.testing.assert_allclose(routing.combine_weight[g], expected.combine_weight, rtol=1e-5)
    losses.append(expected.aux_losses["load_loss"])
  np.testing.assert_allclose(routing.aux_losses["load_loss"], np.mean(losses), rtol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    router(x, train=True, rng=None)
  causal = lambda k, dispatch="capacity": noisy_top_k.NoisyTopKRouter.causal_in_sequence(
    router.options, base.MoESettings(num_experts=4, top_k=k, group_size=16, dispatch=dispatch)
  )
  assert causal(1) and not causal(2) and causal(2, "dropless")
  assert router.capacity(16, 1.25) == 10  # ceil(1.25 * 16 * 2 / 4)


def test_noisy_gradients_reach_both_kernels_from_zero_init():
  router = make_noisy()
  x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 8, 16)), jnp.float32)
  coeff = jnp.asarray(np.random.default_rng(13).normal(size=(2, 16)), jnp.float32)

  @nnx.jit
  def grads(router):
    def loss(router):
      r = router(x, train=True, rng=jax.random.key(0))
      return jnp.sum(coeff * r.combine_weight) + sum(r.aux_losses.values())

    return nnx.grad(loss)(router)

  g = grads(router)
  for kernel in (g.w_gate[...], g.w_noise[...]):
    assert bool(jnp.all(jnp.isfinite(kernel))) and float(jnp.abs(kernel).sum()) > 0


# ==============================================================================================
# Registry and end to end


def load_recipe(name, preset=""):
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.parametrize(
  "recipe, router_cls",
  [("gshard_top2", gshard_top2.GShardTop2Router), ("noisy_topk", noisy_top_k.NoisyTopKRouter)],
)
def test_registry_and_recipes(recipe, router_cls):
  full, tiny = load_recipe(recipe), load_recipe(recipe, "tiny")
  assert routers.get(full.model.moe.router) is router_cls
  assert tiny.model.moe.router == full.model.moe.router
  # Both use top-k > 1, which needs position groups to stay causal.
  for cfg in (full, tiny):
    assert cfg.model.moe.group_layout == "position" and not cfg.model.moe.allow_noncausal
  config_lib.validate(full, 8)
  config_lib.validate(tiny, 1)
  # The tiny preset is switch_base's tiny preset with this router: same sizes and schedule.
  switch = load_recipe("switch_base", "tiny")
  for section in ("train", "optim"):
    assert tiny[section].to_dict() == switch[section].to_dict()
  for key in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size"):
    assert tiny.model[key] == switch.model[key]
  assert tiny.model.moe.num_experts == switch.model.moe.num_experts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("router", ["gshard_top2", "noisy_top_k"])
def test_short_training_run_on_eight_devices(router, corpus, tmp_path):
  cfg = tiny_config(corpus, data=2, expert=4)
  moe = cfg.model.moe
  moe.router, moe.top_k = router, 2
  # k = 2 is not causal within a sequence: group the 8 sequences of the batch by position.
  moe.group_layout, moe.group_size = "position", 8
  # stop_at before train.steps: no evaluation pass to compile, one checkpoint at the stop.
  cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 100, 100, 100
  losses = train.run(cfg, str(tmp_path / "run"), progress=False, stop_at=10)["losses"]
  values = np.array([losses[s] for s in sorted(losses)])
  assert len(values) == 10 and np.all(np.isfinite(values))
  assert values[-3:].mean() < values[:3].mean()
  logged = metrics_lib.read_metrics(str(tmp_path / "run"))[-1]
  if router == "gshard_top2":
    # Random routing drops some second choices at training time and keeps the rest.
    assert 0 < logged["layer_1/second_kept_fraction"] < 1
  else:
    assert logged["layer_1/load_loss"] >= 0 and logged["layer_1/importance_loss"] >= 0
  assert np.array(logged["layer_1/expert_load"]).sum() == pytest.approx(1.0, abs=1e-5)
