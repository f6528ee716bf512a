"""Token-choice top-k routing, its aux losses, the TopKRouter module and the router registry."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.model import routers
from moejax.model.routers import top_k
from moejax.ops import aux_losses

# Jitted once per shape: on CPU, one compile beats compiling every primitive eagerly.
route = jax.jit(top_k.route_top_k, static_argnames=("top_k", "normalize_weights"))


@functools.partial(nnx.jit, static_argnames=("train",))
def call_router(router, x, rng, train):
  return router(x, train=train, rng=rng)


def reference_top_k(probs_se, k):
  """Per token, the k largest probabilities, by a python sort; pairs choice-rank-major."""
  tokens, experts, gates = [], [], []
  for rank in range(k):
    for s, row in enumerate(np.asarray(probs_se).tolist()):
      order = sorted(range(len(row)), key=lambda e, row=row: -row[e])
      tokens.append(s)
      experts.append(order[rank])
      gates.append(row[order[rank]])
  return np.array(tokens), np.array(experts), np.array(gates)


# Four tokens, four experts; every row sums to 1, so softmax(log(probs)) == probs.
PROBS = np.array(
  [
    [0.6, 0.2, 0.1, 0.1],  # top-1: e0
    [0.1, 0.7, 0.1, 0.1],  # top-1: e1
    [0.5, 0.3, 0.1, 0.1],  # top-1: e0
    [0.2, 0.2, 0.5, 0.1],  # top-1: e2
  ],
  np.float32,
)

# ----------------------------------------------------------------------------------------------
# aux losses


def test_load_balance_loss_hand_case_top1():
  mask = jax.nn.one_hot(jnp.array([0, 1, 0, 2]), 4)
  # P = column means of PROBS = [1.4, 1.4, 0.8, 0.4] / 4 = [0.35, 0.35, 0.2, 0.1]
  # f = top-1 counts / S     = [2, 1, 1, 0] / 4      = [0.5, 0.25, 0.25, 0]
  # loss = E * sum f*P = 4 * (0.175 + 0.0875 + 0.05 + 0) = 4 * 0.3125 = 1.25
  loss = aux_losses.load_balance_loss(jnp.asarray(PROBS), mask)
  np.testing.assert_allclose(loss, 1.25, rtol=1e-6)
  assert loss.dtype == jnp.float32 and loss.shape == ()


def test_load_balance_loss_hand_case_top2_indicator():
  mask = jnp.array([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
  # f = [2, 3, 1, 2] / 4 = [0.5, 0.75, 0.25, 0.5]; P = [0.35, 0.35, 0.2, 0.1]
  # loss = 4 * (0.175 + 0.2625 + 0.05 + 0.05) = 4 * 0.5375 = 2.15
  loss = aux_losses.load_balance_loss(jnp.asarray(PROBS), mask)
  np.testing.assert_allclose(loss, 2.15, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balance_loss_uniform_routing_is_k(k):
  num_tokens, num_experts = 8, 4
  probs = jnp.full((num_tokens, num_experts), 1 / num_experts)
  # Token s chooses experts s % E, ..., (s + k - 1) % E: every expert chosen 2k times.
  mask = sum(
    jax.nn.one_hot((jnp.arange(num_tokens) + r) % num_experts, num_experts) for r in range(k)
  )
  # loss = E * sum_i (k / E) * (1 / E) = k
  np.testing.assert_allclose(aux_losses.load_balance_loss(probs, mask), float(k), rtol=1e-6)


def test_router_z_loss_hand_case():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  # logsumexp row 0 = log(1 + 1) = ln 2;  row 1 = log(3 + 1) = 2 ln 2
  # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 * 0.480453 = 1.201133
  np.testing.assert_allclose(aux_losses.router_z_loss(logits), 2.5 * math.log(2) ** 2, rtol=1e-6)


def test_router_entropy_hand_case():
  probs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  # entropies: 0 (one-hot, no NaN from 0 log 0) and ln 2; mean = ln2 / 2
  np.testing.assert_allclose(aux_losses.router_entropy(probs), math.log(2) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# route_top_k


def test_route_top1_hand_case():
  routing = route(jnp.log(PROBS), top_k=1)
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3])
  np.testing.assert_array_equal(routing.expert_index, [0, 1, 0, 2])
  # Switch: the gate is the probability of the chosen expert, not renormalised.
  np.testing.assert_allclose(routing.combine_weight, [0.6, 0.7, 0.5, 0.5], rtol=1e-6)
  assert bool(jnp.all(routing.valid))
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], 1.25, rtol=1e-6)
  # Rows of PROBS sum to 1, so logsumexp(log PROBS) = 0 for every token.
  np.testing.assert_allclose(routing.aux_losses["router_z_loss"], 0.0, atol=1e-10)
  np.testing.assert_allclose(routing.metrics["expert_load"], [0.5, 0.25, 0.25, 0.0])


def test_route_top2_hand_case_is_choice_rank_major():
  probs = np.array(
    [
      [0.50, 0.30, 0.15, 0.05],  # choices e0 (0.5), e1 (0.3)
      [0.10, 0.60, 0.05, 0.25],  # choices e1 (0.6), e3 (0.25)
      [0.20, 0.10, 0.40, 0.30],  # choices e2 (0.4), e3 (0.3)
      [0.35, 0.05, 0.15, 0.45],  # choices e3 (0.45), e0 (0.35)
    ],
    np.float32,
  )
  routing = route(jnp.log(probs), top_k=2)
  # Pairs 0..3: every token's first choice in token order; pairs 4..7: the second choices.
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(routing.expert_index, [0, 1, 2, 3, 1, 3, 3, 0])
  np.testing.assert_allclose(
    routing.combine_weight, [0.5, 0.6, 0.4, 0.45, 0.3, 0.25, 0.3, 0.35], rtol=1e-6
  )
  # expert_load: choices per expert [2, 2, 1, 3] / (S*k = 8)
  np.testing.assert_allclose(routing.metrics["expert_load"], [0.25, 0.25, 0.125, 0.375])
  # P = [1.15, 1.05, 0.75, 1.05] / 4; f (indicator) = [2, 2, 1, 3] / 4
  # loss = 4 * (2*1.15 + 2*1.05 + 0.75 + 3*1.05) / 16 = 8.3 / 4 = 2.075
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], 2.075, rtol=1e-6)
  norm = route(jnp.log(probs), top_k=2, normalize_weights=True)
  # token 0: 0.5 / (0.5 + 0.3) = 0.625 and 0.3 / 0.8 = 0.375
  np.testing.assert_allclose(norm.combine_weight[np.array([0, 4])], [0.625, 0.375], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_top_k_matches_sort_reference(k):
  rng = np.random.default_rng(k)
  num_tokens, num_experts = 6, 5
  logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  routing = route(logits, top_k=k)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  tokens, experts, gates = reference_top_k(probs, k)
  np.testing.assert_array_equal(routing.token_index, tokens)
  np.testing.assert_array_equal(routing.expert_index, experts)
  # Combine weights are the router probabilities of the chosen experts.
  np.testing.assert_allclose(routing.combine_weight, gates, rtol=1e-6)
  load = np.bincount(experts, minlength=num_experts) / (num_tokens * k)
  np.testing.assert_allclose(routing.metrics["expert_load"], load, rtol=1e-6)
  mask = np.zeros((num_tokens, num_experts))
  mask[tokens, experts] = 1.0
  lb = num_experts * np.sum(mask.mean(0) * probs.mean(0))
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], lb, rtol=1e-5)
  entropy = np.mean(-np.sum(probs * np.log(probs), axis=-1))
  np.testing.assert_allclose(routing.metrics["router_entropy"], entropy, rtol=1e-5)


def test_normalized_top2_weights_sum_to_one():
  rng = np.random.default_rng(7)
  num_tokens = 6
  logits = rng.normal(size=(num_tokens, 4)).astype(np.float32)
  raw = route(logits, top_k=2)
  norm = route(logits, top_k=2, normalize_weights=True)
  weight_ks = np.asarray(norm.combine_weight).reshape(2, num_tokens)
  np.testing.assert_allclose(weight_ks.sum(axis=0), 1.0, rtol=1e-6)
  # Renormalising keeps the choices and the ratio between a token's two gates.
  np.testing.assert_array_equal(norm.expert_index, raw.expert_index)
  raw_ks = np.asarray(raw.combine_weight).reshape(2, num_tokens)
  np.testing.assert_allclose(weight_ks[0] / weight_ks[1], raw_ks[0] / raw_ks[1], rtol=1e-5)


def test_route_top_k_rejects_too_many_choices():
  with pytest.raises(ValueError, match="top_k=5"):
    top_k.route_top_k(jnp.zeros((2, 4)), top_k=5)


# ----------------------------------------------------------------------------------------------
# TopKRouter module


def make_router(**kwargs):
  args = dict(d_model=16, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  return top_k.TopKRouter.make(**(args | kwargs))


def test_router_kernel_has_axes_and_small_init():
  router = make_router(init_std=0.02)
  assert router.kernel.shape == (16, 4) and router.kernel.dtype == jnp.float32
  assert router.kernel.axes == ("embed", None)
  assert sharding.param_axes(router.kernel) == ("embed", None)
  assert 0.005 < float(jnp.std(router.kernel[...])) < 0.05


def test_router_output_shapes_and_per_group_routing():
  num_groups, num_tokens = 3, 5
  router = make_router()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(num_groups, num_tokens, 16)))
  routing = call_router(router, x.astype(jnp.bfloat16), None, False)
  for field in (routing.token_index, routing.expert_index, routing.combine_weight, routing.valid):
    assert field.shape == (num_groups, num_tokens * 2)
  assert routing.combine_weight.dtype == jnp.float32
  assert routing.aux_losses["load_balance_loss"].shape == ()
  assert routing.aux_losses["router_z_loss"].shape == ()
  assert routing.metrics["expert_load"].shape == (4,)
  assert routing.metrics["router_entropy"].shape == ()
  # Group g is routed from its own logits x_g W (float32 math on the bfloat16-rounded input).
  logits = jnp.einsum("gsd,de->gse", x.astype(jnp.bfloat16).astype(jnp.float32), router.kernel[...])
  expected = route(logits[1], top_k=2)
  np.testing.assert_array_equal(routing.expert_index[1], expected.expert_index)
  np.testing.assert_allclose(routing.combine_weight[1], expected.combine_weight, rtol=1e-5)


def test_jitter_only_when_training_with_positive_eps():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16)), jnp.float32)
  key = jax.random.key(3)
  plain = call_router(make_router(), x, None, True)
  jittery = make_router(jitter_eps=0.1)
  # Same kernel (same init seed); eval mode or eps=0 means no noise at all.
  np.testing.assert_array_equal(
    call_router(jittery, x, key, False).combine_weight, plain.combine_weight
  )
  np.testing.assert_array_equal(
    call_router(make_router(), x, key, True).combine_weight, plain.combine_weight
  )
  noisy = call_router(jittery, x, key, True)
  assert not np.allclose(noisy.combine_weight, plain.combine_weight)
  assert noisy.aux_losses["router_z_loss"] != plain.aux_losses["router_z_loss"]
  # The noise is x * U[0.9, 1.1] drawn from the given key.
  noise = jax.random.uniform(key, x.shape, jnp.float32, 0.9, 1.1)
  logits = jnp.einsum("gsd,de->gse", x * noise, jittery.kernel[...])
  np.testing.assert_allclose(
    noisy.combine_weight[0], route(logits[0], top_k=2).combine_weight, rtol=1e-5
  )
  with pytest.raises(ValueError, match="rng"):
    jittery(x, train=True, rng=None)


def test_router_gradients_reach_the_kernel():
  router = make_router()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 16)), jnp.float32)

  @nnx.jit
  def grads(router):
    def loss(router):
      r = router(x, train=False, rng=None)
      return (
        jnp.sum(r.combine_weight)
        + r.aux_losses["load_balance_loss"]
        + r.aux_losses["router_z_loss"]
      )

    return nnx.grad(loss)(router)

  g = grads(router).kernel[...]
  assert g.shape == (16, 4) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


# ----------------------------------------------------------------------------------------------
# registry


def test_router_registry():
  assert routers.get("switch") is top_k.TopKRouter
  assert routers.get("top_k") is top_k.TopKRouter
  assert routers.family("top_k") == "switch"
  with pytest.raises(ValueError, match="model.moe.router='nope' is not one of: .*switch.*top_k"):
    routers.get("nope")
