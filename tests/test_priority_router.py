"""Batch-prioritized routing: capacity to the most confident tokens first, as flaxformer does;
the switch option `batch_prioritized` through the MoE layer; evaluation without capacity drops
(`model.moe.eval_dispatch`)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import routers
from moejax.model.routers import base, priority, top_k
from moejax.model.transformer import Transformer
from moejax.ops import capacity
from tests.helpers import tiny_config

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


def _switch_layer(top_k_=2, **moe_values):
  cfg = tiny_config("unused")
  moe = cfg.model.moe
  moe.top_k, moe.group_size = top_k_, 16
  for key, value in moe_values.items():
    moe[key] = value
  moe.switch.init_std = 1.0  # confident, uneven routing: capacity pressure
  return cfg, Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn


@pytest.mark.parametrize("k", [1, 2])
def test_switch_option_keeps_flaxformers_pairs_in_the_layer(k):
  cfg, layer = _switch_layer(k, capacity_factor=1.0)
  layer.router.options = dataclasses.replace(layer.router.options, batch_prioritized=True)
  x = jax.random.normal(jax.random.key(0), (2, 32, 64))
  x_gsd, routing = layer.route(x, train=True, rng=None)
  kept = layer.kept_pairs(routing, train=True)
  cap = layer.capacity(16, train=True)
  logits = np.asarray(x_gsd, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
  for g in range(x_gsd.shape[0]):
    probs = np.exp(logits[g]) / np.exp(logits[g]).sum(-1, keepdims=True)
    got = {
      (int(t), int(e)): float(w)
      for t, e, w, ok in zip(
        routing.token_index[g],
        routing.expert_index[g],
        routing.combine_weight[g],
        kept[g],
        strict=True,
      )
      if ok
    }
    expected = reference_flaxformer(probs, k, cap)
    assert got.keys() == expected.keys()
    assert len(got) < 16 * k  # capacity pressure
  # The layer's output is the kept pairs' weighted expert outputs: compare with priority off.
  y_prioritized, _, _ = layer(x, train=True, rng=None)
  layer.router.options = dataclasses.replace(layer.router.options, batch_prioritized=False)
  y_plain, _, _ = layer(x, train=True, rng=None)
  assert not np.allclose(y_prioritized, y_plain)


def test_batch_prioritized_is_declared_non_causal_with_capacity():
  cls = routers.get("switch")
  opts = cls.Options(batch_prioritized=True)
  settings = lambda **kw: base.MoESettings(num_experts=4, top_k=1, group_size=16, **kw)
  assert not cls.causal_in_sequence(opts, settings())
  assert not cls.causal_in_sequence(opts, settings(dispatch="all_to_all"))
  assert cls.causal_in_sequence(opts, settings(dispatch="dropless"))
  assert cls.causal_in_sequence(cls.Options(), settings())


def test_eval_dispatch_dropless_removes_evaluation_drops():
  """With capacity factor 1 at evaluation, the capacity dispatch drops pairs; with
  model.moe.eval_dispatch='dropless' nothing is dropped and the output equals the capacity
  dispatch given room for every pair; training keeps its capacity dispatch."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 64))
  results = {}
  for label, values in {
    "drops": dict(capacity_factor=1.0, eval_capacity_factor=1.0),
    "dropless_eval": dict(capacity_factor=1.0, eval_capacity_factor=1.0, eval_dispatch="dropless"),
    "room": dict(eval_capacity_factor=4.0),
  }.items():
    _, layer = _switch_layer(2, **values)
    y, _, metrics = layer(x, train=False, rng=None)
    results[label] = (np.asarray(y), float(metrics["dropped_fraction"]))
    if label == "dropless_eval":
      _, _, train_metrics = layer(x, train=True, rng=None)
      assert float(train_metrics["dropped_fraction"]) > 0  # training still has capacity
  assert results["drops"][1] > 0.05
  assert results["dropless_eval"][1] == 0.0 and results["room"][1] == 0.0
  np.testing.assert_allclose(results["dropless_eval"][0], results["room"][0], atol=1e-5)
  assert not np.allclose(results["drops"][0], results["room"][0], atol=1e-3)
