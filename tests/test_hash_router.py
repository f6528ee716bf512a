"""Hash Layers routing: the random and balanced tables and route_hash."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.routers import hash_layers as hash_router

route = jax.jit(hash_router.route_hash, static_argnames=("num_experts",))


def reference_balanced_table(counts, num_experts):
  """Greedy bin packing by a plain scan: seen ids by (-count, id), each to the expert with the
  smallest (total, id); unseen ids round-robin in id order."""
  table = [0] * len(counts)
  totals = [0] * num_experts
  for token in sorted(range(len(counts)), key=lambda v: (-counts[v], v)):
    if counts[token] == 0:
      continue
    expert = min(range(num_experts), key=lambda e: (totals[e], e))
    table[token] = expert
    totals[expert] += counts[token]
  unseen = [v for v in range(len(counts)) if counts[v] == 0]
  for rank, token in enumerate(unseen):
    table[token] = rank % num_experts
  return np.array(table)


def test_random_table_is_seeded_and_uniform():
  vocab, experts = 16000, 8
  table = hash_router.random_hash_table(vocab, experts)
  assert table.dtype == np.int32 and table.shape == (vocab,)
  np.testing.assert_array_equal(table, hash_router.random_hash_table(vocab, experts, seed=42))
  assert np.mean(table != hash_router.random_hash_table(vocab, experts, seed=7)) > 0.8
  assert table.min() == 0 and table.max() == experts - 1
  # 2000 ids per expert expected; the binomial std is ~42, so +-200 is about 5 sigma.
  np.testing.assert_array_less(np.abs(np.bincount(table, minlength=experts) - 2000), 200)


def test_balanced_table_hand_case():
  counts = [5, 3, 3, 0, 1, 0, 8]
  # Visit by decreasing count: id6 (8), id0 (5), id1 (3), id2 (3, after id1), id4 (1).
  # totals [0,0,0]: id6 -> e0 [8,0,0]; id0 -> e1 [8,5,0]; id1 -> e2 [8,5,3];
  # id2 -> e2 (3 smallest) [8,5,6]; id4 -> e1 (5 smallest) [8,6,6].
  # Unseen ids 3, 5 are dealt round-robin: id3 -> e0, id5 -> e1.
  table = hash_router.balanced_hash_table(np.array(counts), 3)
  np.testing.assert_array_equal(table, [1, 2, 2, 0, 1, 1, 0])
  # Ties between equal totals go to the lowest expert id: two equal counts, two experts.
  np.testing.assert_array_equal(hash_router.balanced_hash_table(np.array([4, 4, 4]), 2), [0, 1, 0])


@pytest.mark.parametrize("num_experts", [2, 5, 16])
def test_balanced_table_matches_greedy_reference_on_zipf_counts(num_experts):
  rng = np.random.default_rng(num_experts)
  vocab = 3000
  # Zipfian counts with many ties and some unseen ids, as BPE unigram counts are.
  counts = (1e5 / np.arange(1, vocab + 1) ** 1.1).astype(np.int64)
  counts = rng.permutation(counts)
  counts[rng.choice(vocab, 200, replace=False)] = 0
  table = hash_router.balanced_hash_table(counts, num_experts)
  np.testing.assert_array_equal(table, reference_balanced_table(counts.tolist(), num_experts))
  totals = np.bincount(table, weights=counts, minlength=num_experts)
  # Greedy packing leaves the loads within one largest count of each other.
  assert totals.max() - totals.min() <= counts.max()
  # And the token loads are far better balanced than a random table's.
  random_totals = np.bincount(
    hash_router.random_hash_table(vocab, num_experts), weights=counts, minlength=num_experts
  )
  assert totals.max() / totals.mean() < random_totals.max() / random_totals.mean()


def test_balanced_table_rejects_bad_counts():
  with pytest.raises(ValueError, match="counts >= 0"):
    hash_router.balanced_hash_table(np.array([3, -1]), 2)
  with pytest.raises(ValueError, match="one count per token id"):
    hash_router.balanced_hash_table(np.ones((2, 2)), 2)
  with pytest.raises(ValueError, match="num_experts=0"):
    hash_router.random_hash_table(10, 0)


def test_route_hash_is_the_table_lookup():
  rng = np.random.default_rng(0)
  vocab, experts, tokens = 50, 4, 12
  table = hash_router.random_hash_table(vocab, experts, seed=1)
  ids = rng.integers(0, vocab, size=tokens)
  routing = route(jnp.asarray(ids), jnp.asarray(table), num_experts=experts)
  np.testing.assert_array_equal(routing.token_index, np.arange(tokens))
  np.testing.assert_array_equal(routing.expert_index, table[ids])
  np.testing.assert_array_equal(routing.combine_weight, np.ones(tokens))
  assert routing.combine_weight.dtype == jnp.float32 and bool(jnp.all(routing.valid))
  assert routing.aux_losses == {}
  load = np.bincount(table[ids], minlength=experts) / tokens
  np.testing.assert_allclose(routing.metrics["expert_load"], load, rtol=1e-6)


def test_route_hash_vmaps_over_groups():
  rng = np.random.default_rng(1)
  table = jnp.asarray(hash_router.balanced_hash_table(rng.integers(0, 100, size=30), 3))
  ids_gs = jnp.asarray(rng.integers(0, 30, size=(4, 6)))
  batched = jax.jit(
    jax.vmap(functools.partial(hash_router.route_hash, num_experts=3), in_axes=(0, None))
  )(ids_gs, table)
  for g in range(4):
    single = route(ids_gs[g], table, num_experts=3)
    np.testing.assert_array_equal(batched.expert_index[g], single.expert_index)
    np.testing.assert_allclose(batched.metrics["expert_load"][g], single.metrics["expert_load"])
