"""Batch-prioritized routing: capacity to the most confident tokens first, as flaxformer does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.routers import base, priority, top_k
from moejax.ops import capacity

route_top_k = jax.jit(top_k.route_top_k, static_argnames=("top_k",))


@functools.partial(jax.jit, static_argnames=("k", "cap", "prioritized"))
def kept_pairs(logits_se, *, k, cap, prioritized):
  """Routes with route_top_k (optionally batch-prioritized) and applies capacity dispatch."""
  routing = top_k.route_top_k(logits_se, top_k=k)
  if prioritized:
    probs_se = jax.nn.softmax(logits_se.astype(jnp.float32), axis=-1)
    routing = priority.batch_prioritized(routing, jnp.max(probs_se, axis=-1))
  _, kept = capacity.compute_slots(routing.expert_index, routing.valid, logits_se.shape[-1], cap)
  return routing, kept


def as_set(routing, kept):
  """{(token, expert): weight} of the kept pairs."""
  return {
    (int(t), int(e)): float(w)
    for t, e, w, ok in zip(
      routing.token_index, routing.expert_index, routing.combine_weight, kept, strict=True
    )
    if ok
  }


def reference_flaxformer(probs_se, k, cap):
  """flaxformer's TokensChoose rule with batch_prioritized_routing: tokens sorted by decreasing
  top-1 probability (stable), then all first choices in that order, then all second choices...;
  a choice is kept while its expert has had fewer than `cap` earlier choices."""
  probs = np.asarray(probs_se, np.float64)
  num_tokens, num_experts = probs.shape
  choices = [
    sorted(range(num_experts), key=lambda e, s=s: -probs[s, e])[:k] for s in range(num_tokens)
  ]
  order = sorted(range(num_tokens), key=lambda s: -probs[s].max())  # python sort is stable
  claims = [0] * num_experts
  kept = {}
  for rank in range(k):
    for s in order:
      e = choices[s][rank]
      if claims[e] < cap:
        kept[(s, e)] = probs[s, e]
      claims[e] += 1
  return kept


def test_hand_case_capacity_goes_to_the_confident_tokens():
  probs = np.array(
    [
      [0.6, 0.4],  # e0 at .6
      [0.9, 0.1],  # e0 at .9
      [0.3, 0.7],  # e1 at .7
      [0.2, 0.8],  # e1 at .8
    ],
    np.float32,
  )
  logits = jnp.log(probs)
  # One slot per expert. Token order keeps t0 (e0) and t2 (e1); by priority the order is
  # t1 (.9), t3 (.8), t2 (.7), t0 (.6), so t1 takes e0 and t3 takes e1.
  plain = as_set(*kept_pairs(logits, k=1, cap=1, prioritized=False))
  assert plain.keys() == {(0, 0), (2, 1)}
  routing, kept = kept_pairs(logits, k=1, cap=1, prioritized=True)
  np.testing.assert_array_equal(routing.token_index, [1, 3, 2, 0])
  assert as_set(routing, kept).keys() == {(1, 0), (3, 1)}
  np.testing.assert_allclose(sorted(as_set(routing, kept).values()), [0.8, 0.9], rtol=1e-6)


@pytest.mark.parametrize("k,cap", [(1, 2), (2, 3), (2, 1), (3, 4)])
def test_kept_pairs_equal_flaxformer_rule(k, cap):
  rng = np.random.default_rng(10 * k + cap)
  num_tokens, num_experts = 16, 4
  logits = jnp.asarray(rng.normal(size=(num_tokens, num_experts)) * 2, jnp.float32)
  routing, kept = kept_pairs(logits, k=k, cap=cap, prioritized=True)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  expected = reference_flaxformer(probs, k, cap)
  got = as_set(routing, kept)
  assert got.keys() == expected.keys()
  for pair, weight in expected.items():
    np.testing.assert_allclose(got[pair], weight, rtol=1e-6)
  # Capacity pressure is real here: prioritizing changes which pairs survive.
  plain = as_set(*kept_pairs(logits, k=k, cap=cap, prioritized=False))
  assert len(got) < num_tokens * k and plain.keys() != got.keys()


def test_reorders_only_the_tokens_within_each_rank():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  routing = route_top_k(logits, top_k=2)
  prio = jnp.array([0.1, 0.5, 0.5, 0.9, 0.0, 0.3])
  reordered = jax.jit(priority.batch_prioritized)(routing, prio)
  # Decreasing priority, ties in token order: t3 (.9), t1, t2 (.5), t5 (.3), t0 (.1), t4 (0).
  order = [3, 1, 2, 5, 0, 4]
  np.testing.assert_array_equal(reordered.token_index, order * 2)
  for r in range(2):
    for j, s in enumerate(order):
      n, m = r * 6 + j, r * 6 + s
      assert int(reordered.expert_index[n]) == int(routing.expert_index[m])
      assert float(reordered.combine_weight[n]) == float(routing.combine_weight[m])
  for name, loss in routing.aux_losses.items():
    assert float(reordered.aux_losses[name]) == float(loss)
  np.testing.assert_array_equal(reordered.metrics["expert_load"], routing.metrics["expert_load"])
  # With room for every pair the kept set is all pairs, in any order.
  _, kept = capacity.compute_slots(reordered.expert_index, reordered.valid, 5, 12)
  assert bool(jnp.all(kept))


def test_vmap_over_groups():
  logits_gse = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6, 4)), jnp.float32)

  def fn(logits_se):
    routing = top_k.route_top_k(logits_se, top_k=2)
    return priority.batch_prioritized(routing, jnp.max(jax.nn.softmax(logits_se), axis=-1))

  batched = jax.jit(jax.vmap(fn))(logits_gse)
  for g in range(3):
    single = jax.jit(fn)(logits_gse[g])
    np.testing.assert_array_equal(batched.token_index[g], single.token_index)
    np.testing.assert_array_equal(batched.expert_index[g], single.expert_index)


def test_rejects_pairs_that_are_not_rank_major_over_the_tokens():
  pairs = jnp.zeros((8,), jnp.int32)
  routing = base.SparseRouting(pairs, pairs, pairs.astype(jnp.float32), pairs == 0)
  with pytest.raises(ValueError, match="8 pairs"):
    priority.batch_prioritized(routing, jnp.zeros((3,)))


def test_rank_major_routing_hand_case():
  # Two tokens, two choices each: t0 -> (e3, .7), (e1, .2); t1 -> (e0, .6), (e2, .3), the
  # second choice of t1 not valid. Pairs: t0's first, t1's first, t0's second, t1's second.
  routing = base.rank_major_routing(
    jnp.array([[3, 1], [0, 2]]),
    jnp.array([[0.7, 0.2], [0.6, 0.3]]),
    jnp.array([[True, True], [True, False]]),
    aux_losses={},
    metrics={},
  )
  np.testing.assert_array_equal(routing.token_index, [0, 1, 0, 1])
  np.testing.assert_array_equal(routing.expert_index, [3, 0, 1, 2])
  np.testing.assert_allclose(routing.combine_weight, [0.7, 0.6, 0.2, 0.3])
  np.testing.assert_array_equal(routing.valid, [True, True, True, False])
  assert routing.expert_index.dtype == jnp.int32 and routing.combine_weight.dtype == jnp.float32
