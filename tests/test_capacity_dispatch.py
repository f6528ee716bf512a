"""The capacity dispatch against hand-worked cases and per-pair python loop references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from moejax import sharding
from moejax.model.routers import top_k
from moejax.ops import capacity

# ----------------------------------------------------------------------------------------------
# References: plain python loops over pairs.


def reference_slots(expert_index, valid, num_experts, cap):
  """Slot = earlier valid claims on the same expert; kept = valid and slot < cap."""
  counts = [0] * num_experts
  slots, kept = [], []
  for e, v in zip(np.asarray(expert_index).tolist(), np.asarray(valid).tolist(), strict=True):
    slots.append(counts[e])
    kept.append(bool(v) and counts[e] < cap)
    if v:
      counts[e] += 1
  return np.array(slots), np.array(kept)


def expert_mlp(x_d, w_in_df, w_out_fd):
  return jnp.tanh(x_d @ w_in_df) @ w_out_fd


def batched_expert_fn(w_in_edf, w_out_efd):
  def fn(buf_gecd):
    h_gecf = jnp.tanh(jnp.einsum("gecd,edf->gecf", buf_gecd, w_in_edf))
    return jnp.einsum("gecf,efd->gecd", h_gecf, w_out_efd)

  return fn


def reference_moe(x_gsd, token_gn, expert_gn, valid_gn, weight_gn, w_in_edf, w_out_efd, cap):
  """Every expert on every token; a python loop over pairs picks which (token, expert) count.

  Per group, pairs claim their expert in priority order while it has room; a kept pair adds
  weight * expert_e(x_s) to token s. The loop builds a 0/1 table kept_gnse, so the math below
  needs no buffers, scatters or gathers.
  """
  num_groups, num_tokens, _ = x_gsd.shape
  num_experts = w_in_edf.shape[0]
  kept_gnse = np.zeros((num_groups, token_gn.shape[1], num_tokens, num_experts), np.float32)
  for g in range(num_groups):
    counts = [0] * num_experts
    for n in range(token_gn.shape[1]):
      s, e = int(token_gn[g, n]), int(expert_gn[g, n])
      if not valid_gn[g, n]:
        continue
      if counts[e] < cap:
        kept_gnse[g, n, s, e] = 1.0
      counts[e] += 1
  expert_out_gsed = jnp.stack(
    [expert_mlp(x_gsd, w_in_edf[e], w_out_efd[e]) for e in range(num_experts)], axis=2
  )
  gate_gse = jnp.einsum("gn,gnse->gse", weight_gn, kept_gnse)
  return jnp.einsum("gse,gsed->gsd", gate_gse, expert_out_gsed)


# Jitted once per shape: on CPU, one compile beats compiling every primitive eagerly.
route = jax.jit(top_k.route_top_k, static_argnames=("top_k", "normalize_weights"))
compute_slots = jax.jit(capacity.compute_slots, static_argnames=("num_experts", "capacity"))


def route_groups(logits_gse, k):
  return jax.vmap(functools.partial(route, top_k=k))(logits_gse)


def random_routing(rng, num_groups, num_tokens, num_experts, k):
  logits_gse = rng.normal(size=(num_groups, num_tokens, num_experts)).astype(np.float32)
  return route_groups(logits_gse, k)


def normal(rng, *shape, scale=1.0):
  # numpy, not jax.random: test data then costs no XLA compilation.
  return jnp.asarray(rng.normal(scale=scale, size=shape), jnp.float32)


# ----------------------------------------------------------------------------------------------
# token_choice_capacity


@pytest.mark.parametrize(
  "num_tokens, num_experts, k, cf, expected",
  [
    (8, 4, 1, 1.0, 2),  # 1.0 * 8 * 1 / 4 = 2
    (8, 4, 1, 1.25, 3),  # 1.25 * 8 / 4 = 2.5 -> 3
    (8, 4, 2, 1.0, 4),  # 1.0 * 8 * 2 / 4 = 4
    (4, 64, 1, 1.0, 1),  # 4 / 64 = 0.0625 -> at least 1
    (10, 1, 1, 1.1, 11),  # 1.1 * 10 = 11.000000000000002 in floats, still 11
  ],
)
def test_token_choice_capacity(num_tokens, num_experts, k, cf, expected):
  c = capacity.token_choice_capacity(num_tokens, num_experts, k, cf)
  assert c == expected and isinstance(c, int)


def test_token_choice_capacity_rejects_bad_factor():
  with pytest.raises(ValueError, match="capacity_factor"):
    capacity.token_choice_capacity(8, 4, 1, 0.0)


# ----------------------------------------------------------------------------------------------
# compute_slots


def test_compute_slots_hand_case():
  expert = jnp.array([0, 1, 0, 0, 1, 2, 0])
  valid = jnp.array([True, True, False, True, True, True, True])
  # capacity 2. Running count of valid claims per expert, in pair order:
  # pair 0 -> e0 slot 0          pair 4 -> e1 slot 1
  # pair 1 -> e1 slot 0          pair 5 -> e2 slot 0
  # pair 2 -> e0 invalid (1 earlier valid claim: slot 1, not kept, claims nothing)
  # pair 3 -> e0 slot 1          pair 6 -> e0 slot 2 >= 2: dropped
  slot, kept = compute_slots(expert, valid, num_experts=3, capacity=2)
  np.testing.assert_array_equal(slot, [0, 0, 1, 1, 1, 0, 2])
  np.testing.assert_array_equal(kept, [True, True, False, True, True, True, False])
  assert slot.dtype == jnp.int32


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_compute_slots_matches_loop(cap):
  rng = np.random.default_rng(0)
  num_experts, num_pairs = 5, 40
  expert = rng.integers(0, num_experts, size=num_pairs)
  valid = rng.random(num_pairs) < 0.8
  slot, kept = compute_slots(expert, valid, num_experts, cap)
  ref_slot, ref_kept = reference_slots(expert, valid, num_experts, cap)
  np.testing.assert_array_equal(slot, ref_slot)
  np.testing.assert_array_equal(kept, ref_kept)
  # No expert holds more than C pairs, and every expert is full or got all its valid claims.
  kept_per_expert = np.bincount(np.asarray(expert)[np.asarray(kept)], minlength=num_experts)
  valid_per_expert = np.bincount(np.asarray(expert)[np.asarray(valid)], minlength=num_experts)
  np.testing.assert_array_equal(kept_per_expert, np.minimum(valid_per_expert, cap))


def test_first_choices_beat_second_choices():
  # S=4 tokens, E=3, k=2, capacity_factor 1: C = ceil(4 * 2 / 3) = ceil(2.67) = 3.
  logits = jnp.array(
    [
      [2.0, 3.0, 0.0],  # token 0: first e1, second e0
      [3.0, 2.0, 0.0],  # token 1: first e0, second e1
      [3.0, 0.0, 2.0],  # token 2: first e0, second e2
      [3.0, 0.0, 2.0],  # token 3: first e0, second e2
    ]
  )
  cap = capacity.token_choice_capacity(4, 3, 2, 1.0)
  assert cap == 3
  routing = route(logits, top_k=2)
  # Pairs: [t0:e1, t1:e0, t2:e0, t3:e0 | t0:e0, t1:e1, t2:e2, t3:e2].
  np.testing.assert_array_equal(routing.expert_index, [1, 0, 0, 0, 0, 1, 2, 2])
  slot, kept = compute_slots(routing.expert_index, routing.valid, 3, cap)
  # e0 is claimed by the first choices of t1, t2, t3 (slots 0, 1, 2) and then by t0's second
  # choice (slot 3 >= 3: dropped). Token-major order would have dropped t3's first choice.
  np.testing.assert_array_equal(slot, [0, 0, 1, 2, 3, 1, 0, 1])
  np.testing.assert_array_equal(kept, [True, True, True, True, False, True, True, True])
  ref_slot, ref_kept = reference_slots(routing.expert_index, routing.valid, 3, cap)
  np.testing.assert_array_equal(slot, ref_slot)
  np.testing.assert_array_equal(kept, ref_kept)


# ----------------------------------------------------------------------------------------------
# dispatch / combine


def test_dispatch_and_combine_hand_case():
  # S=3 tokens, D=2, E=2, C=1. Pairs: t0->e1, t1->e1 (dropped: e1 full), t2->e0.
  x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  token = jnp.array([0, 1, 2])
  expert = jnp.array([1, 1, 0])
  weight = jnp.array([0.5, 0.25, 2.0])
  slot, kept = compute_slots(expert, jnp.ones(3, bool), num_experts=2, capacity=1)
  np.testing.assert_array_equal(kept, [True, False, True])
  buf = capacity.dispatch(x, token, expert, slot, kept, num_experts=2, capacity=1)
  # buf[e0, 0] = x[2], buf[e1, 0] = x[0]; x[1] went nowhere.
  np.testing.assert_array_equal(buf, [[[5.0, 6.0]], [[1.0, 2.0]]])
  # Expert "outputs" with a nonzero value everywhere, so a wrong gather would show.
  y = buf * 10.0 + 1.0  # e0: [51, 61], e1: [11, 21]
  out = capacity.combine(y, token, expert, slot, kept, weight, num_tokens=3)
  # t0: 0.5 * [11, 21]; t1: dropped -> exactly 0; t2: 2.0 * [51, 61].
  np.testing.assert_array_equal(out, [[5.5, 10.5], [0.0, 0.0], [102.0, 122.0]])
  assert out.dtype == jnp.float32
  frac = capacity.dropped_fraction(jnp.ones(3, bool), kept)
  np.testing.assert_allclose(frac, 1 / 3)


def test_dropped_tokens_get_exactly_zero_and_kept_get_weighted_expert():
  num_tokens, num_experts, dim = 8, 2, 4
  x = normal(np.random.default_rng(1), 1, num_tokens, dim)
  # Every token's first choice is e0; C=3, so tokens 3..7 are dropped.
  logits = jnp.tile(jnp.array([[1.0, 0.0]]), (num_tokens, 1))
  routing = route_groups(logits[None], 1)
  scale = jnp.array([2.0, -3.0])

  def expert_fn(buf_gecd):  # expert e: 2x+1 / -3x+1, nonzero on an empty (zero) slot
    return buf_gecd * scale[None, :, None, None] + 1.0

  run = lambda x, r: capacity.capacity_moe(x, r, expert_fn, num_experts=num_experts, capacity=3)
  y, stats = jax.jit(run)(x, routing)
  p0 = jax.nn.softmax(jnp.array([1.0, 0.0]))[0]  # e / (e + 1) = 0.731
  np.testing.assert_allclose(y[0, :3], p0 * (2.0 * x[0, :3] + 1.0), rtol=1e-6)
  np.testing.assert_array_equal(y[0, 3:], 0.0)
  np.testing.assert_allclose(stats["dropped_fraction"], 5 / 8)


# ----------------------------------------------------------------------------------------------
# capacity_moe vs the reference loop, values and gradients


@pytest.mark.parametrize(
  "k, cf, expect_drops, with_invalid",
  [
    (1, 0.5, True, False),
    (1, 4.0, False, False),
    (2, 0.5, True, False),
    (2, 4.0, False, False),
    (2, 0.5, True, True),  # some pairs invalid: they claim nothing and output nothing
  ],
)
def test_capacity_moe_matches_reference(k, cf, expect_drops, with_invalid):
  num_groups, num_tokens, num_experts, dim, hidden = 2, 8, 4, 6, 5
  rng = np.random.default_rng(k)
  x = normal(rng, num_groups, num_tokens, dim)
  w_in = normal(rng, num_experts, dim, hidden, scale=dim**-0.5)
  w_out = normal(rng, num_experts, hidden, dim, scale=hidden**-0.5)
  routing = random_routing(rng, num_groups, num_tokens, num_experts, k)
  if with_invalid:
    valid = jnp.asarray(rng.random(routing.valid.shape) < 0.75)
    routing = dataclasses.replace(routing, valid=valid)
  cap = capacity.token_choice_capacity(num_tokens, num_experts, k, cf)
  # cf=4 gives C >= S: no expert can overflow (a token's k choices are distinct).
  assert (cap >= num_tokens) == (not expect_drops)
  cotangent = normal(rng, *x.shape)
  idx = jax.tree.map(np.asarray, (routing.token_index, routing.expert_index, routing.valid))

  def fast(x, w_in, w_out, weight):
    r = dataclasses.replace(routing, combine_weight=weight)
    fn = batched_expert_fn(w_in, w_out)
    y, stats = capacity.capacity_moe(x, r, fn, num_experts=num_experts, capacity=cap)
    return jnp.sum(y * cotangent), (y, stats)

  def ref(x, w_in, w_out, weight):
    y = reference_moe(x, *idx, weight, w_in, w_out, cap)
    return jnp.sum(y * cotangent), y

  args = (x, w_in, w_out, routing.combine_weight)
  grad_fast, (y_fast, stats) = jax.jit(jax.grad(fast, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  grad_ref, y_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  np.testing.assert_allclose(y_fast, y_ref, atol=1e-5)
  for g_fast, g_ref in zip(grad_fast, grad_ref, strict=True):
    np.testing.assert_allclose(g_fast, g_ref, atol=1e-5)

  kept = [reference_slots(e, v, num_experts, cap)[1] for e, v in zip(idx[1], idx[2], strict=True)]
  num_dropped = int(np.sum(idx[2]) - np.sum(kept))
  assert (num_dropped > 0) == expect_drops
  np.testing.assert_allclose(stats["dropped_fraction"], num_dropped / np.sum(idx[2]), rtol=1e-6)


def test_capacity_moe_keeps_dtype_and_rejects_bad_expert_output():
  rng = np.random.default_rng(2)
  x = normal(rng, 2, 4, 8).astype(jnp.bfloat16)
  routing = random_routing(rng, 2, 4, 4, 2)
  run = lambda x, r: capacity.capacity_moe(x, r, lambda b: b * 2, num_experts=4, capacity=2)
  y, _ = jax.jit(run)(x, routing)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  bad = lambda x, r: capacity.capacity_moe(x, r, lambda b: b[..., :4], num_experts=4, capacity=2)
  with pytest.raises(ValueError, match="expert_fn returned"):
    jax.eval_shape(bad, x, routing)


def test_capacity_moe_under_sharding_constraints():
  # 8 CPU devices: groups over data x expert (8 shards, one group each), experts over
  # expert=4 (the dispatched buffer is exchanged between them); results must not change.
  mesh = jax.make_mesh((2, 1, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  num_experts = 4
  rng = np.random.default_rng(4)
  x = normal(rng, 8, 8, 6)
  w = normal(rng, num_experts, 6, 6)
  routing = random_routing(rng, 8, 8, num_experts, 2)
  expert_fn = lambda b: jnp.einsum("gecd,edf->gecf", b, w)
  run = lambda x, r, rules: capacity.capacity_moe(
    x, r, expert_fn, num_experts=num_experts, capacity=3, rules=rules
  )
  y_plain, _ = jax.jit(run, static_argnums=2)(x, routing, None)
  with jax.set_mesh(mesh):
    y_sharded, _ = jax.jit(run, static_argnums=2)(x, routing, sharding.DEFAULT)
  np.testing.assert_allclose(y_sharded, y_plain, atol=1e-5)
