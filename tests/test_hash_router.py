"""Hash Layers routing: the random and balanced tables, route_hash, the hash router through the
MoE layer and the token-counts tool."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import token_counts
from moejax.data import pipeline
from moejax.model.routers import hash_layers as hash_router
from moejax.model.transformer import Transformer
from tests.family_configs import family_config, write_counts
from tests.helpers import tiny_config, write_corpus

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


def test_random_table_is_the_hash_of_every_id():
  ids = np.arange(5000)
  for seed in (0, 42):
    np.testing.assert_array_equal(
      hash_router.random_hash_table(5000, 7, seed),
      hash_router.hash_experts(jnp.asarray(ids), 7, seed),
    )


def test_ids_beyond_the_table_use_the_random_hash():
  table = jnp.asarray([3, 3, 3], jnp.int32)
  ids = jnp.asarray([0, 2, 3, 17, 1000])
  routing = route(ids, table, num_experts=4)
  expected = [3, 3, *np.asarray(hash_router.hash_experts(ids[2:], 4))]
  np.testing.assert_array_equal(routing.expert_index, expected)


def _expert_ffn(bank, e, x_d):
  """One token through expert e of an ExpertBank, in float64 (GELU, no gate)."""
  w_in, w_out = (np.asarray(bank.weights()[k][e], np.float64) for k in ("w_in", "w_out"))
  h = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x_d, np.float64) @ w_in)), np.float64)
  return h @ w_out


@pytest.mark.parametrize("table", ["random", "balanced"])
def test_moe_layer_sends_each_token_to_its_ids_expert(table, tmp_path):
  """Per token: y = expert_{table[id]}(x) with weight 1 (dropless: nothing dropped)."""
  cfg = family_config("hash")
  cfg.model.moe.dispatch = "dropless"
  if table == "balanced":
    cfg.model.moe.hash.table = "balanced"
    cfg.model.moe.hash.token_counts = write_counts(tmp_path / "c.npy", 300)  # ids >= 300: hash
  layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.model.vocab_size)
  x = jax.random.normal(jax.random.key(1), (2, 32, 64))
  y, losses, metrics = layer(x, train=True, rng=None, token_ids_bl=tokens)
  assert losses == {}
  ids = np.asarray(tokens).reshape(-1)
  if table == "balanced":
    counts = np.load(tmp_path / "c.npy")
    lookup = hash_router.balanced_hash_table(counts, 4)
    np.testing.assert_array_equal(layer.router.table[...], lookup)
    experts = [lookup[i] if i < 300 else int(hash_router.hash_experts(i, 4)) for i in ids]
  else:
    experts = hash_router.random_hash_table(cfg.model.vocab_size, 4)[ids]
  expected = np.stack(
    [_expert_ffn(layer.experts, e, x_d) for e, x_d in zip(experts, x.reshape(-1, 64), strict=True)]
  )
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 64), expected, atol=1e-4, rtol=1e-4)
  load = np.bincount(experts, minlength=4) / len(experts)
  np.testing.assert_allclose(metrics["expert_load"], load, atol=1e-6)


def test_token_counts_of_the_training_split(tmp_path):
  """The counts tool counts exactly the training blocks' input ids (a python Counter here)."""
  cfg = tiny_config(write_corpus(tmp_path, num_files=2, words_per_file=2000))
  workdir = str(tmp_path / "run")
  counts = token_counts.write_counts(cfg, workdir, str(tmp_path / "out" / "counts.npy"))
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "counts.npy"), counts)
  data = pipeline.build_dataset(cfg.data, workdir=workdir, vocab_size=512, seq_len=32)
  reference = collections.Counter(np.asarray(data.train_blocks)[:, :-1].reshape(-1).tolist())
  assert counts.shape == (512,) and counts.dtype == np.int64
  assert {i: int(c) for i, c in enumerate(counts) if c} == dict(reference)
  assert counts.sum() == data.train_blocks.shape[0] * 32
  # Deterministic: a second call (same workdir, same tokenizer) writes the same counts.
  again = token_counts.write_counts(cfg, workdir, str(tmp_path / "again.npy"))
  np.testing.assert_array_equal(again, counts)
