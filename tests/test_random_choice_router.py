"""THOR: uniformly random experts at three draw levels, the symmetric-KL consistency term, and
the `random` router through the MoE layer (per-sequence draws across groups, the evaluation
choices) and the two-pass train step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import optim, train_step
from moejax.model import routers
from moejax.model.routers import random_choice
from moejax.model.transformer import Transformer
from tests.family_configs import family_config

route = jax.jit(random_choice.route_random, static_argnums=(0, 1), static_argnames=("level",))
symmetric_kl = jax.jit(random_choice.symmetric_kl)


def test_token_level_is_uniform_and_seeded():
  num_tokens, num_experts = 40000, 4
  routing = route(num_tokens, num_experts, jax.random.key(0), level="token")
  experts = np.asarray(routing.expert_index)
  # 10000 per expert expected; the binomial std is ~87, so +-500 is about 6 sigma.
  np.testing.assert_array_less(np.abs(np.bincount(experts, minlength=4) - 10000), 500)
  np.testing.assert_array_equal(
    route(num_tokens, num_experts, jax.random.key(0), level="token").expert_index, experts
  )
  assert (
    np.mean(experts != route(num_tokens, 4, jax.random.key(1), level="token").expert_index) > 0.5
  )
  # Weight 1, every pair valid, pair s is token s, no aux loss, load = bincount / S.
  np.testing.assert_array_equal(routing.token_index, np.arange(num_tokens))
  np.testing.assert_array_equal(routing.combine_weight, 1.0)
  assert bool(jnp.all(routing.valid)) and routing.aux_losses == {}
  np.testing.assert_allclose(
    routing.metrics["expert_load"], np.bincount(experts, minlength=4) / num_tokens, rtol=1e-6
  )


def test_sequence_level_agrees_within_a_sequence_and_across_groups():
  key = jax.random.key(3)
  num_experts = 5
  # Two groups holding interleaved pieces of six sequences, as the 'position' layout does.
  ids_a = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  ids_b = jnp.array([3, 4, 4, 5, 5, 0, 1, 2])
  draw = jax.jit(
    functools.partial(random_choice.draw_experts, level="sequence"), static_argnums=(0, 1)
  )
  experts_a = np.asarray(draw(8, num_experts, key, sequence_ids_s=ids_a))
  experts_b = np.asarray(draw(8, num_experts, key, sequence_ids_s=ids_b))
  per_sequence = {}
  for ids, experts in ((ids_a, experts_a), (ids_b, experts_b)):
    for seq, expert in zip(np.asarray(ids).tolist(), experts.tolist(), strict=True):
      assert per_sequence.setdefault(seq, expert) == expert  # one expert per sequence
  # Over many sequences the per-sequence draws are uniform.
  many = np.asarray(draw(20000, 4, key, sequence_ids_s=jnp.arange(20000)))
  np.testing.assert_array_less(np.abs(np.bincount(many, minlength=4) - 5000), 400)
  # Without ids the group is one sequence: every token shares one draw.
  single = np.asarray(draw(8, num_experts, key))
  assert len(set(single.tolist())) == 1


def test_batch_level_is_one_draw_per_key_and_uniform_over_keys():
  routing = route(16, 6, jax.random.key(0), level="batch")
  assert len(set(np.asarray(routing.expert_index).tolist())) == 1
  keys = jax.random.split(jax.random.key(1), 6000)
  draws = jax.vmap(lambda k: random_choice.draw_experts(3, 6, k, level="batch")[0])(keys)
  np.testing.assert_array_less(np.abs(np.bincount(np.asarray(draws), minlength=6) - 1000), 150)


def test_vmap_over_groups_with_split_keys():
  keys = jax.random.split(jax.random.key(2), 3)
  fn = functools.partial(random_choice.route_random, 8, 4, level="token")
  batched = jax.jit(jax.vmap(fn))(keys)
  for g in range(3):
    np.testing.assert_array_equal(
      batched.expert_index[g], route(8, 4, keys[g], level="token").expert_index
    )


def test_rejects_unknown_level_and_bad_ids():
  with pytest.raises(ValueError, match="level='example'"):
    random_choice.route_random(4, 2, jax.random.key(0), level="example")
  with pytest.raises(ValueError, match="sequence_ids_s"):
    random_choice.draw_experts(4, 2, jax.random.key(0), sequence_ids_s=jnp.zeros((3,), int))


def test_symmetric_kl_hand_case():
  # p1 = [.5, .5], p2 = [.8, .2]:
  # KL(p1||p2) = .5 ln(.5/.8) + .5 ln(.5/.2) = .5 ln(1.5625)          = 0.2231436
  # KL(p2||p1) = .8 ln(1.6) + .2 ln(.4) = 0.3760029 - 0.1832581        = 0.1927448
  # (1/2)(sum) = 0.2079442 = .5 * (-.3 * ln(.5/.8) + .3 * ln(.5/.2)) = 0.3 ln 2
  logits_a = jnp.array([[0.0, 0.0], [1.0, 2.0], [0.0, 5.0]])
  logits_b = jnp.array([[math.log(0.8), math.log(0.2)], [1.0, 2.0], [3.0, 0.0]])
  one = symmetric_kl(logits_a[:1], logits_b[:1])
  np.testing.assert_allclose(one, 0.3 * math.log(2), rtol=1e-6)
  # Position 1 has equal distributions (0); position 2 is masked out: mean = 0.2079442 / 2.
  mask = jnp.array([True, True, False])
  np.testing.assert_allclose(symmetric_kl(logits_a, logits_b, mask), 0.15 * math.log(2), rtol=1e-6)
  assert symmetric_kl(logits_a, logits_a).dtype == jnp.float32
  np.testing.assert_allclose(symmetric_kl(logits_a, logits_a), 0.0, atol=1e-7)
  np.testing.assert_allclose(symmetric_kl(logits_a, logits_b, jnp.zeros(3, bool)), 0.0)


def test_symmetric_kl_matches_per_position_loop_and_is_symmetric():
  rng = np.random.default_rng(0)
  logits_a = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
  logits_b = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
  mask = rng.random(size=(2, 5)) > 0.3
  total, count = 0.0, 0
  for b in range(2):
    for t in range(5):
      if not mask[b, t]:
        continue
      p = np.exp(logits_a[b, t].astype(np.float64))
      p /= p.sum()
      q = np.exp(logits_b[b, t].astype(np.float64))
      q /= q.sum()
      total += 0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
      count += 1
  value = symmetric_kl(jnp.asarray(logits_a), jnp.asarray(logits_b), jnp.asarray(mask))
  np.testing.assert_allclose(value, total / count, rtol=1e-5)
  swapped = symmetric_kl(jnp.asarray(logits_b), jnp.asarray(logits_a), jnp.asarray(mask))
  np.testing.assert_allclose(swapped, value, rtol=1e-6)
  # Gradients flow into both passes, finite, and vanish where the passes agree.
  grads = jax.jit(jax.grad(random_choice.symmetric_kl, argnums=(0, 1)))(
    jnp.asarray(logits_a), jnp.asarray(logits_b), jnp.asarray(mask)
  )
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  same = jax.grad(random_choice.symmetric_kl)(jnp.asarray(logits_a), jnp.asarray(logits_a))
  np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_symmetric_kl_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes differ"):
    random_choice.symmetric_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def _layer(layout="sequence", group_size=16, **options):
  cfg = family_config("random")
  cfg.model.moe.group_layout, cfg.model.moe.group_size = layout, group_size
  for key, value in options.items():
    cfg.model.moe.random[key] = value
  return Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn


def _experts_per_sequence(layer, routing):
  """{global batch row: set of experts its tokens went to} from a layer's routing."""
  rows = layer.to_groups(jnp.broadcast_to(jnp.arange(8)[:, None], (8, 32)))
  out = {}
  token_rows = np.take_along_axis(np.asarray(rows), np.asarray(routing.token_index), axis=1)
  experts = np.asarray(routing.expert_index).reshape(-1)
  for row, expert in zip(token_rows.reshape(-1), experts, strict=True):
    out.setdefault(int(row), set()).add(int(expert))
  return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_expert_per_sequence_in_every_layout(train):
  """A sequence spans 2 groups ('sequence', S = 16 < L = 32) or 32 ('position'): its tokens
  share one draw, the same in both layouts; evaluation draws from the fixed key."""
  x = jnp.zeros((8, 32, 64))
  ids = jnp.zeros((8, 32), jnp.int32)
  rng = jax.random.key(5)
  draws = {}
  for layout, group_size in (("sequence", 16), ("position", 4)):
    layer = _layer(layout, group_size)
    _, routing = layer.route(x, train=train, rng=rng, token_ids_bl=ids)
    per_sequence = _experts_per_sequence(layer, routing)
    assert all(len(experts) == 1 for experts in per_sequence.values())
    draws[layout] = {row: experts.pop() for row, experts in per_sequence.items()}
  assert draws["sequence"] == draws["position"]
  key = rng if train else jax.random.wrap_key_data(layer.router.eval_key[...])
  expected = random_choice.draw_experts(8, 4, key, level="sequence", sequence_ids_s=jnp.arange(8))
  assert [draws["sequence"][b] for b in range(8)] == np.asarray(expected).tolist()
  assert len(set(draws["sequence"].values())) > 1


def test_token_level_and_pass_keys_differ():
  layer = _layer(level="token")
  x, ids = jnp.zeros((8, 32, 64)), jnp.zeros((8, 32), jnp.int32)
  _, first = layer.route(x, train=True, rng=jax.random.key(0), token_ids_bl=ids)
  per_sequence = _experts_per_sequence(layer, first)
  assert max(len(e) for e in per_sequence.values()) > 1  # tokens of a sequence differ
  _, second = layer.route(x, train=True, rng=jax.random.key(1), token_ids_bl=ids)
  assert np.mean(np.asarray(first.expert_index) != np.asarray(second.expert_index)) > 0.5


def test_ensemble_evaluation_is_the_mean_of_all_experts():
  layer = _layer(eval_choice="ensemble")
  x = jax.random.normal(jax.random.key(0), (8, 32, 64))
  y, _, metrics = layer(x, train=False, rng=None, token_ids_bl=jnp.zeros((8, 32), jnp.int32))
  w = {
    k: np.asarray(v, np.float64)
    for k, v in layer.experts.weights().items()
    if k[0] == "w" and v is not None
  }
  x64 = np.asarray(x, np.float64).reshape(-1, 64)
  outs = [
    np.asarray(jax.nn.gelu(jnp.asarray(x64 @ w["w_in"][e]))) @ w["w_out"][e] for e in range(4)
  ]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 64), np.mean(outs, axis=0), atol=1e-4)
  np.testing.assert_allclose(metrics["expert_load"], [0.25] * 4)


def test_train_step_runs_two_passes_with_the_consistency_term():
  """The step's cross-entropy is CE(pass 1) + CE(pass 2) and `consistency_loss` is the
  symmetric KL of the two passes' logits, recomputed here from the step's keys."""
  cfg = family_config("random")
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, 3)
  passes = routers.consistency(cfg.model.moe)
  step = train_step.make_train_step(
    graphdef, opt, {}, optim.learning_rate_schedule(cfg.optim, 8), consistency=passes
  )
  tokens = jax.random.randint(jax.random.key(0), (8, 33), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  _, metrics = jax.jit(step)(state, batch)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
  forward = nnx.merge(graphdef, params, rest)
  first, _ = forward(batch["inputs"], train=True, rng=rng)
  second, _ = forward(batch["inputs"], train=True, rng=jax.random.fold_in(rng, 1))
  assert not np.allclose(first, second)  # different draws
  ce = train_step.cross_entropy(first, batch["targets"])
  ce = ce + train_step.cross_entropy(second, batch["targets"])
  np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-5)
  kl = random_choice.symmetric_kl(first, second)
  np.testing.assert_allclose(metrics["consistency_loss"], kl, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], ce + 1.0 * kl, rtol=1e-5)
