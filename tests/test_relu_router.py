"""ReMoE ReLU routing: pairs, the load-balanced L1 term, metrics and the adaptive coefficient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.routers import relu

route = jax.jit(relu.route_relu, static_argnames=("max_experts", "top_k"))


def reference_relu(logits_se, max_experts):
  """Per token by a python sort: the positive gates, largest first, at most k_max; valid pairs
  only, keyed by their choice-rank-major position."""
  pairs = {}
  for s, row in enumerate(np.asarray(logits_se, np.float64).tolist()):
    positive = sorted((e for e in range(len(row)) if row[e] > 0), key=lambda e, row=row: -row[e])
    for rank, e in enumerate(positive[:max_experts]):
      pairs[rank * len(logits_se) + s] = (s, e, row[e])
  return pairs


LOGITS = np.array(
  [
    [1.0, -0.5, 2.0, 0.0],  # gates [1, 0, 2, 0]
    [-1.0, -2.0, -0.1, -3.0],  # gates all 0: residual only
    [0.5, 0.5, -1.0, 3.0],  # gates [.5, .5, 0, 3]: three positive, k_max = 2 cuts one
  ],
  np.float32,
)


def test_hand_case_pairs_loss_and_metrics():
  routing = route(LOGITS, max_experts=2, top_k=1)
  # Rank 0: t0 -> e2 (2), t1 -> none, t2 -> e3 (3); rank 1: t0 -> e0 (1), t1 none, t2 -> e0
  # (0.5, tied with e1: the lower index).
  np.testing.assert_array_equal(routing.valid, [1, 0, 1, 1, 0, 1])
  valid = np.asarray(routing.valid)
  np.testing.assert_array_equal(np.asarray(routing.token_index)[valid], [0, 2, 0, 2])
  np.testing.assert_array_equal(np.asarray(routing.expert_index)[valid], [2, 3, 0, 0])
  np.testing.assert_allclose(routing.combine_weight, [2, 0, 3, 1, 0, 0.5])
  # Positive gates per expert: e0 {t0, t2} = 2, e1 {t2} = 1, e2 {t0} = 1, e3 {t2} = 1; 5 in all.
  # f_e = E / (k S) * count = 4/3 * [2, 1, 1, 1] = [8/3, 4/3, 4/3, 4/3]
  # L = (1/S) sum_s sum_e f_e R = (1/3) (8/3 * (1 + .5) + 4/3 * .5 + 4/3 * 2 + 4/3 * 3)
  #   = (1/3) (4 + 2/3 + 8/3 + 4) = (1/3) (34/3) = 34/9
  np.testing.assert_allclose(routing.aux_losses["relu_l1_loss"], 34 / 9, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["sparsity"], 1 - 5 / 12, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["active_experts_per_token"], 5 / 3, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["truncated_fraction"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["expert_load"], np.array([2, 1, 1, 1]) / 5)


def test_balanced_use_makes_the_l1_term_the_plain_l1():
  # Token s has one positive gate, on expert s: every f_e = 4 / (1 * 4) * 1 = 1, so the term is
  # the mean L1 norm of the gates: (1 + 2 + 3 + 4) / 4 = 2.5.
  logits = np.diag([1.0, 2.0, 3.0, 4.0]).astype(np.float32) - 0.5 * (
    1 - np.eye(4, dtype=np.float32)
  )
  routing = route(logits, max_experts=1, top_k=1)
  np.testing.assert_allclose(routing.aux_losses["relu_l1_loss"], 2.5, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["sparsity"], 1 - 1 / 4)


@pytest.mark.parametrize("max_experts", [1, 3, 6])
def test_matches_sort_reference(max_experts):
  rng = np.random.default_rng(max_experts)
  num_tokens, num_experts, top_k = 10, 6, 2
  logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  routing = route(logits, max_experts=max_experts, top_k=top_k)
  pairs = reference_relu(logits, max_experts)
  np.testing.assert_array_equal(np.flatnonzero(routing.valid), sorted(pairs))
  for n, (token, expert, gate) in pairs.items():
    assert int(routing.token_index[n]) == token and int(routing.expert_index[n]) == expert
    np.testing.assert_allclose(routing.combine_weight[n], gate, rtol=1e-6)
  gates = np.maximum(logits.astype(np.float64), 0)
  counts = (gates > 0).sum(0)
  f = num_experts / (top_k * num_tokens) * counts
  np.testing.assert_allclose(
    routing.aux_losses["relu_l1_loss"], np.sum(gates * f) / num_tokens, rtol=1e-5
  )
  truncated = ((gates > 0).sum(1) > max_experts).mean()
  np.testing.assert_allclose(routing.metrics["truncated_fraction"], truncated)
  np.testing.assert_allclose(routing.metrics["sparsity"], 1 - (gates > 0).mean(), rtol=1e-6)


def test_untruncated_pairs_equal_the_dense_relu_moe():
  """With k_max = E the pairs give y = sum_e ReLU(h)_e * E_e(x): the dense reference."""
  rng = np.random.default_rng(5)
  num_tokens, num_experts, dim = 7, 5, 3
  logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  x = rng.normal(size=(num_tokens, dim))
  experts = rng.normal(size=(num_experts, dim, dim))  # linear experts E_e(x) = x A_e
  dense = sum(np.maximum(logits[:, e : e + 1], 0) * (x @ experts[e]) for e in range(num_experts))
  routing = route(logits, max_experts=num_experts, top_k=1)
  sparse = np.zeros_like(x)
  for n in np.flatnonzero(routing.valid):
    s, e = int(routing.token_index[n]), int(routing.expert_index[n])
    sparse[s] += float(routing.combine_weight[n]) * (x[s] @ experts[e])
  np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_l1_gradient_flows_through_the_gates_only():
  # f_e carries no gradient, so d L / d h_s,e = f_e / S where h > 0 and 0 where h < 0.
  grad = jax.jit(
    jax.grad(lambda h: relu.route_relu(h, max_experts=2, top_k=1).aux_losses["relu_l1_loss"])
  )(jnp.asarray(LOGITS))
  f = np.array([8, 4, 4, 4]) / 3
  expected = (LOGITS > 0) * f / 3
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
  weights = jax.grad(lambda h: jnp.sum(relu.route_relu(h, max_experts=2, top_k=1).combine_weight))
  g = weights(jnp.asarray(LOGITS))
  assert bool(jnp.all(jnp.isfinite(g)))
  # Only the kept positive gates carry the weight gradient (t2's third gate e1 was cut).
  np.testing.assert_array_equal(g, [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]])


def test_adaptive_coefficient_rule():
  target = relu.target_sparsity(1, 8)
  assert target == 0.875  # 1 - k/E
  lam = relu.L1_COEF_INIT
  # Too dense (sparsity below target): multiply by 1.2; sparse enough: divide; equality divides.
  np.testing.assert_allclose(relu.update_l1_coef(lam, 0.5, target), 1.2e-8, rtol=1e-6)
  np.testing.assert_allclose(relu.update_l1_coef(lam, 0.9, target), 1e-8 / 1.2, rtol=1e-6)
  np.testing.assert_allclose(relu.update_l1_coef(lam, target, target), 1e-8 / 1.2, rtol=1e-6)
  # Five dense steps grow lambda geometrically: 1e-8 * 1.2^5.
  for _ in range(5):
    lam = relu.update_l1_coef(lam, jnp.float32(0.1), target)
  np.testing.assert_allclose(lam, 1e-8 * 1.2**5, rtol=1e-5)
  assert lam.dtype == jnp.float32
  # jit-compatible with a traced sparsity.
  np.testing.assert_allclose(jax.jit(relu.update_l1_coef)(1.0, 0.95, 0.875), 1 / 1.2, rtol=1e-6)


def test_vmap_over_groups_matches_single_groups():
  logits_gse = jnp.asarray(np.random.default_rng(6).normal(size=(3, 5, 4)), jnp.float32)
  batched = jax.jit(jax.vmap(functools.partial(relu.route_relu, max_experts=2, top_k=1)))(
    logits_gse
  )
  for g in range(3):
    single = route(logits_gse[g], max_experts=2, top_k=1)
    np.testing.assert_array_equal(batched.valid[g], single.valid)
    np.testing.assert_allclose(batched.combine_weight[g], single.combine_weight)
    np.testing.assert_allclose(
      batched.aux_losses["relu_l1_loss"][g], single.aux_losses["relu_l1_loss"]
    )


def test_rejects_bad_sizes():
  with pytest.raises(ValueError, match="max_experts=0"):
    relu.route_relu(jnp.zeros((2, 4)), max_experts=0, top_k=1)
  with pytest.raises(ValueError, match="top_k=5"):
    relu.route_relu(jnp.zeros((2, 4)), max_experts=2, top_k=5)
