"""Dynamic top-p routing: keep rule, static bound, aux losses and metrics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.routers import top_p

route = jax.jit(top_p.route_top_p, static_argnames=("max_experts", "threshold"))


def reference_top_p(probs_se, threshold, max_experts):
  """Per token by a python sort: keep while the mass before an expert is <= P, at most k_max.

  Returns choice-rank-major (token, expert, gate, valid) lists for the valid pairs and, per token,
  the kept count and whether k_max cut the rule short."""
  pairs, kept_counts, truncated = {}, [], []
  for s, row in enumerate(np.asarray(probs_se, np.float64).tolist()):
    order = sorted(range(len(row)), key=lambda e, row=row: -row[e])
    kept, before = [], 0.0
    for e in order:
      if before > threshold:
        break
      kept.append(e)
      before += row[e]
    kept_counts.append(min(len(kept), max_experts))
    truncated.append(len(kept) > max_experts)
    for rank, e in enumerate(kept[:max_experts]):
      pairs[rank * len(probs_se) + s] = (s, e, row[e])
  return pairs, np.array(kept_counts), np.array(truncated)


PROBS = np.array(
  [
    [0.50, 0.30, 0.15, 0.05],  # e0 (before 0) kept; e1 (before .50 > .4) dropped -> {e0}
    [0.10, 0.35, 0.30, 0.25],  # e1 (0), e2 (.35) kept; e3 (.65) dropped -> {e1, e2}
    [0.30, 0.05, 0.20, 0.45],  # e3 (0) kept; e0 (.45) dropped -> {e3}
    [0.20, 0.38, 0.22, 0.20],  # e1 (0), e2 (.38) kept; e0 (.60) dropped -> {e1, e2}
  ],
  np.float32,
)


def test_hand_case_pairs_losses_and_metrics():
  routing = route(jnp.log(PROBS), max_experts=3, threshold=0.4)
  # Rank 0: every token's top expert; rank 1: second choices (kept for tokens 1 and 3);
  # rank 2: third choices, none kept (t3's third is e0, which ties e3 at 0.2: lower index).
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3] * 3)
  np.testing.assert_array_equal(routing.expert_index[:8], [0, 1, 3, 1, 1, 2, 0, 2])
  np.testing.assert_array_equal(routing.valid, [1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0])
  # Gates are the raw probabilities (not renormalised); invalid pairs weigh 0.
  np.testing.assert_allclose(
    routing.combine_weight, [0.5, 0.35, 0.45, 0.38, 0, 0.3, 0, 0.22, 0, 0, 0, 0], atol=1e-6
  )
  # Kept multi-hot f = [1, 2, 2, 1] / 4; P = column means = [1.1, 1.08, 0.87, 0.95] / 4
  # load balance = 4 * (1*1.1 + 2*1.08 + 2*0.87 + 1*0.95) / 16 = 5.95 / 4 = 1.4875
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], 1.4875, rtol=1e-5)
  # Dynamic loss: the mean over tokens of the entropy of each FULL row.
  entropy = lambda row: -sum(p * math.log(p) for p in row)
  expected = sum(entropy(row) for row in PROBS.tolist()) / 4
  np.testing.assert_allclose(routing.aux_losses["dynamic_loss"], expected, rtol=1e-5)
  # Experts per token: (1 + 2 + 1 + 2) / 4 = 1.5; half the tokens keep 1, half keep 2.
  np.testing.assert_allclose(routing.metrics["experts_per_token"], 1.5)
  np.testing.assert_allclose(routing.metrics["experts_per_token_hist"], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(routing.metrics["truncated_fraction"], 0.0)
  np.testing.assert_allclose(routing.metrics["expert_load"], np.array([1, 2, 2, 1]) / 6, rtol=1e-6)


def test_truncation_by_the_static_bound_is_counted():
  # P = 0.7, k_max = 2. t1 sorted .35, .30, .25: befores 0, .35, .65 -> the rule keeps 3 > 2.
  # t0: befores 0, .50, .80 -> 2 kept, not cut. t2: .45, .30 (before .45), .20 (before .75)
  # -> 2. t3: .38, .22 (before .38), .20 (before .60 <= .7) -> 3 > 2: cut.
  routing = route(jnp.log(PROBS), max_experts=2, threshold=0.7)
  np.testing.assert_allclose(routing.metrics["truncated_fraction"], 0.5)
  np.testing.assert_allclose(routing.metrics["experts_per_token"], 2.0)
  assert bool(jnp.all(routing.valid))


@pytest.mark.parametrize(
  "num_experts,max_experts,threshold", [(8, 4, 0.4), (8, 8, 0.4), (6, 2, 0.8), (5, 3, 0.0)]
)
def test_matches_sort_reference(num_experts, max_experts, threshold):
  rng = np.random.default_rng(num_experts + max_experts)
  num_tokens = 16
  logits = (rng.normal(size=(num_tokens, num_experts)) * 1.5).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  # Keep the random case away from float ties with P: no prefix sum within 1e-4 of it.
  assert np.min(np.abs(np.cumsum(-np.sort(-probs, axis=1), axis=1) - threshold)) > 1e-4
  routing = route(logits, max_experts=max_experts, threshold=threshold)
  pairs, kept_counts, truncated = reference_top_p(probs, threshold, max_experts)
  valid = np.asarray(routing.valid)
  np.testing.assert_array_equal(np.flatnonzero(valid), sorted(pairs))
  for n, (token, expert, gate) in pairs.items():
    assert int(routing.token_index[n]) == token and int(routing.expert_index[n]) == expert
    np.testing.assert_allclose(routing.combine_weight[n], gate, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(routing.combine_weight)[~valid], 0.0)
  np.testing.assert_allclose(routing.metrics["experts_per_token"], kept_counts.mean(), rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["truncated_fraction"], truncated.mean())
  if max_experts == num_experts:
    assert not truncated.any()  # k_max = E is the unbounded rule of the paper
  kept = np.zeros((num_tokens, num_experts))
  for token, expert, _ in pairs.values():
    kept[token, expert] = 1.0
  balance = num_experts * np.sum(kept.mean(0) * probs.mean(0))
  np.testing.assert_allclose(routing.aux_losses["load_balance_loss"], balance, rtol=1e-5)
  entropy = np.mean(-np.sum(probs * np.log(probs), axis=1))
  np.testing.assert_allclose(routing.aux_losses["dynamic_loss"], entropy, rtol=1e-5)
  if threshold == 0.0:  # P = 0 keeps exactly the top-1 expert
    np.testing.assert_array_equal(routing.expert_index[:num_tokens], probs.argmax(1))
    assert valid[:num_tokens].all() and not valid[num_tokens:].any()


def test_gradients_are_finite_and_reach_the_logits():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.float32)

  def loss(logits):
    r = top_p.route_top_p(logits, max_experts=3)
    return (
      jnp.sum(r.combine_weight) + r.aux_losses["dynamic_loss"] + r.aux_losses["load_balance_loss"]
    )

  g = jax.jit(jax.grad(loss))(logits)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  # The dynamic loss alone is the mean entropy: its gradient is finite even for peaked rows.
  peaked = jnp.array([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]])
  g = jax.grad(lambda h: top_p.route_top_p(h, max_experts=2).aux_losses["dynamic_loss"])(peaked)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_vmap_over_groups_matches_single_groups():
  logits_gse = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5, 6)), jnp.float32)
  fn = functools.partial(top_p.route_top_p, max_experts=3, threshold=0.4)
  batched = jax.jit(jax.vmap(fn))(logits_gse)
  for g in range(3):
    single = route(logits_gse[g], max_experts=3, threshold=0.4)
    np.testing.assert_array_equal(batched.valid[g], single.valid)
    np.testing.assert_array_equal(batched.expert_index[g], single.expert_index)
    np.testing.assert_allclose(
      batched.aux_losses["dynamic_loss"][g], single.aux_losses["dynamic_loss"]
    )


def test_rejects_bad_bounds():
  with pytest.raises(ValueError, match="max_experts=5"):
    top_p.route_top_p(jnp.zeros((2, 4)), max_experts=5)
  with pytest.raises(ValueError, match="threshold=1.0"):
    top_p.route_top_p(jnp.zeros((2, 4)), max_experts=2, threshold=1.0)
