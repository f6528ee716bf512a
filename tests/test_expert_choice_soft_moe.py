"""Expert-choice and Soft MoE routers against hand-worked cases and python/numpy loop references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import train
from moejax.model import routers
from moejax.model.experts import ExpertBank
from moejax.model.moe_layer import MoELayer
from moejax.model.routers import base, expert_choice, soft_moe
from moejax.ops import capacity, soft
from tests.helpers import tiny_config, write_corpus

MOE_SETTINGS = base.MoESettings(num_experts=4, top_k=1, group_size=8)

# Jitted once per shape: on CPU, one compile beats compiling every primitive eagerly.
route_ec = jax.jit(expert_choice.route_expert_choice, static_argnames=("capacity",))
route_soft = jax.jit(soft_moe.route_soft)


def normal(rng, *shape, scale=1.0):
  # numpy, not jax.random: test data then costs no XLA compilation.
  return rng.normal(scale=scale, size=shape).astype(np.float32)


def np_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def np_expert(x_d, w_in_df, w_out_fd):
  return np.tanh(x_d @ w_in_df) @ w_out_fd


def batched_expert_fn(w_in_edf, w_out_efd):
  """Expert e = tanh(x W_in[e]) W_out[e] on buffers [G, E, C or P, D]."""

  def fn(buf_gecd):
    h_gecf = jnp.tanh(jnp.einsum("gecd,edf->gecf", buf_gecd, w_in_edf, precision="highest"))
    return jnp.einsum("gecf,efd->gecd", h_gecf, w_out_efd, precision="highest")

  return fn


def expert_weights(rng, num_experts, dim, hidden):
  return (
    normal(rng, num_experts, dim, hidden, scale=dim**-0.5),
    normal(rng, num_experts, hidden, dim, scale=hidden**-0.5),
  )


# ==============================================================================================
# Expert choice
# ==============================================================================================


def reference_expert_choice(probs_se, cap):
  """Per expert, its c most probable tokens by a python sort (ties: lower position first)."""
  num_tokens, num_experts = probs_se.shape
  tokens, experts, weights = [], [], []
  for e in range(num_experts):
    order = sorted(range(num_tokens), key=lambda s, e=e: (-probs_se[s, e], s))
    for s in order[:cap]:
      tokens.append(s)
      experts.append(e)
      weights.append(probs_se[s, e])
  return np.array(tokens), np.array(experts), np.array(weights)


@pytest.mark.parametrize(
  "num_tokens, num_experts, cf, expected",
  [
    (16, 8, 2.0, 4),  # 2 * 16 / 8 = 4
    (10, 4, 1.0, 3),  # 10 / 4 = 2.5 -> 3
    (4, 8, 1.0, 1),  # 4 / 8 = 0.5 -> at least 1
    (4, 2, 4.0, 4),  # 4 * 4 / 2 = 8 -> at most S = 4
    (20, 2, 1.1, 11),  # 1.1 * 20 / 2 = 11.000000000000002 in floats, still 11
  ],
)
def test_expert_choice_capacity(num_tokens, num_experts, cf, expected):
  c = expert_choice.expert_choice_capacity(num_tokens, num_experts, cf)
  assert c == expected and isinstance(c, int)
  with pytest.raises(ValueError, match="capacity_factor"):
    expert_choice.expert_choice_capacity(num_tokens, num_experts, 0.0)


# Five tokens, three experts; rows sum to 1, so softmax(log(probs)) == probs.
EC_PROBS = np.array(
  [
    [0.50, 0.30, 0.20],
    [0.60, 0.10, 0.30],
    [0.10, 0.20, 0.70],
    [0.25, 0.50, 0.25],
    [0.45, 0.27, 0.28],  # wanted by nobody: below the top 2 of every column
  ],
  np.float32,
)


def test_expert_choice_hand_case():
  routing = route_ec(jnp.log(EC_PROBS), capacity=2)
  # column e0 = [.5, .6, .1, .25, .45] -> t1 (.6), t0 (.5)
  # column e1 = [.3, .1, .2, .5, .27]  -> t3 (.5), t0 (.3)
  # column e2 = [.2, .3, .7, .25, .28] -> t2 (.7), t1 (.3)
  np.testing.assert_array_equal(routing.token_index, [1, 0, 3, 0, 2, 1])
  np.testing.assert_array_equal(routing.expert_index, [0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(routing.combine_weight, [0.6, 0.5, 0.5, 0.3, 0.7, 0.3], rtol=1e-6)
  assert bool(jnp.all(routing.valid))
  # experts per token: t0 2, t1 2, t2 1, t3 1, t4 0 -> mean 6/5, unrouted 1/5
  np.testing.assert_allclose(routing.metrics["experts_per_token"], 1.2, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["unrouted_fraction"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["expert_load"], [1 / 3] * 3, rtol=1e-6)
  # No load-balancing loss; rows sum to 1 so logsumexp(log p) = 0 and the z-loss is 0.
  assert set(routing.aux_losses) == {"router_z_loss"}
  np.testing.assert_allclose(routing.aux_losses["router_z_loss"], 0.0, atol=1e-10)


@pytest.mark.parametrize("num_tokens, num_experts, cap", [(8, 4, 2), (8, 4, 5), (6, 3, 6)])
def test_expert_choice_matches_sort_reference(num_tokens, num_experts, cap):
  rng = np.random.default_rng(cap)
  logits = normal(rng, num_tokens, num_experts)
  routing = route_ec(logits, capacity=cap)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  tokens, experts, weights = reference_expert_choice(probs, cap)
  np.testing.assert_array_equal(routing.token_index, tokens)
  np.testing.assert_array_equal(routing.expert_index, experts)
  np.testing.assert_allclose(routing.combine_weight, weights, rtol=1e-6)
  # Every expert gets exactly c tokens, each at most once.
  np.testing.assert_array_equal(np.bincount(experts, minlength=num_experts), cap)
  count_s = np.bincount(tokens, minlength=num_tokens)
  np.testing.assert_allclose(routing.metrics["unrouted_fraction"], np.mean(count_s == 0))
  np.testing.assert_allclose(routing.metrics["experts_per_token"], num_experts * cap / num_tokens)
  z = np.mean(np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2)
  np.testing.assert_allclose(routing.aux_losses["router_z_loss"], z, rtol=1e-5)


def test_expert_choice_ties_take_lower_position_first():
  # All tokens identical: every expert takes tokens 0..c-1.
  routing = route_ec(jnp.zeros((6, 3)), capacity=2)
  np.testing.assert_array_equal(routing.token_index, [0, 1, 0, 1, 0, 1])
  np.testing.assert_allclose(routing.combine_weight, 1 / 3, rtol=1e-6)


def make_ec_router(num_experts=4, dim=8, **kwargs):
  return expert_choice.ExpertChoiceRouter.make(
    d_model=dim, num_experts=num_experts, top_k=1, rngs=nnx.Rngs(0), init_std=1.0, **kwargs
  )


@functools.partial(jax.jit, static_argnames=("cap", "num_experts"))
def ec_moe(kernel, x, w_in, w_out, *, cap, num_experts):
  """Expert-choice routing (the pure function on x W) followed by the capacity dispatch."""
  logits_gse = jnp.einsum("gsd,de->gse", x, kernel, precision="highest")
  routing = jax.vmap(functools.partial(expert_choice.route_expert_choice, capacity=cap))(logits_gse)
  fn = batched_expert_fn(w_in, w_out)
  y, stats = capacity.capacity_moe(x, routing, fn, num_experts=num_experts, capacity=cap)
  return y, stats, routing


@pytest.mark.parametrize("cf, cap", [(0.5, 1), (2.0, 4)])  # c = cf * 8 / 4
def test_expert_choice_through_capacity_dispatch_matches_loop(cf, cap):
  num_groups, num_tokens, num_experts, dim, hidden = 2, 8, 4, 8, 6
  rng = np.random.default_rng(0)
  x = normal(rng, num_groups, num_tokens, dim)
  w_in, w_out = expert_weights(rng, num_experts, dim, hidden)
  router = make_ec_router(num_experts, dim, capacity_factor=cf)
  assert router.capacity(num_tokens, cf) == cap
  kernel = np.asarray(router.kernel[...])
  y, stats, routing = ec_moe(kernel, x, w_in, w_out, cap=cap, num_experts=num_experts)
  # The capacity dispatch keeps every pair: each expert fills exactly its c slots.
  assert float(stats["dropped_fraction"]) == 0.0
  slot, kept = jax.vmap(lambda e, v: capacity.compute_slots(e, v, num_experts, cap))(
    routing.expert_index, routing.valid
  )
  assert bool(jnp.all(kept))
  np.testing.assert_array_equal(slot, np.tile(np.arange(cap), num_experts)[None].repeat(2, 0))

  # Reference: y_s = sum over experts e that took s of p[s, e] * expert_e(x_s); zero if none.
  ref = np.zeros_like(x)
  counts = []
  for g in range(num_groups):
    probs = np_softmax(x[g] @ kernel, axis=-1)
    tokens, experts, weights = reference_expert_choice(probs, cap)
    for s, e, w in zip(tokens, experts, weights, strict=True):
      ref[g, s] += w * np_expert(x[g, s], w_in[e], w_out[e])
    count_s = np.bincount(tokens, minlength=num_tokens)
    counts.append(count_s)
    # A token no expert took gets exactly zero MoE output.
    np.testing.assert_array_equal(y[g, count_s == 0], 0.0)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  counts = np.stack(counts)
  if cap == 1:  # E*c = 4 pairs for 8 tokens: at least 4 tokens per group are left out
    assert np.all(np.sum(counts == 0, axis=1) >= 4)
  else:  # E*c = 16 pairs for 8 tokens: some tokens are taken by several experts
    assert np.max(counts) >= 2
  np.testing.assert_allclose(
    routing.metrics["unrouted_fraction"], np.mean(counts == 0, 1), rtol=1e-6
  )


def test_expert_choice_is_permutation_equivariant():
  num_tokens, num_experts, dim = 12, 4, 8
  rng = np.random.default_rng(1)
  x = normal(rng, 1, num_tokens, dim)
  w_in, w_out = expert_weights(rng, num_experts, dim, 5)
  kernel = normal(rng, dim, num_experts)
  perm = rng.permutation(num_tokens)
  run = functools.partial(ec_moe, kernel, w_in=w_in, w_out=w_out, cap=3, num_experts=num_experts)
  y, _, _ = run(x)
  y_perm, _, _ = run(x[:, perm])
  np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-6)


def test_expert_choice_router_module_and_gradients():
  num_experts, dim = 4, 8
  router = make_ec_router(num_experts, dim, capacity_factor=1.0, eval_capacity_factor=2.0)
  x = jnp.asarray(normal(np.random.default_rng(2), 3, 8, dim))
  train_r = nnx.jit(lambda r, x: r(x, train=True))(router, x)
  eval_r = nnx.jit(lambda r, x: r(x, train=False))(router, x)
  # train: c = 1 * 8 / 4 = 2 -> N = 8 pairs; eval: c = 2 * 8 / 4 = 4 -> N = 16.
  assert train_r.token_index.shape == (3, 8) and eval_r.token_index.shape == (3, 16)
  assert train_r.metrics["expert_load"].shape == (num_experts,)
  assert train_r.aux_losses["router_z_loss"].shape == ()
  assert not expert_choice.ExpertChoiceRouter.causal_in_sequence(router.options, MOE_SETTINGS)
  assert routers.get("expert_choice") is expert_choice.ExpertChoiceRouter

  @nnx.jit
  def grads(router):
    def loss(router):
      r = router(x, train=True)
      return jnp.sum(r.combine_weight**2) + r.aux_losses["router_z_loss"]

    return nnx.grad(loss)(router)

  g = grads(router).kernel[...]
  assert g.shape == (dim, num_experts) and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0


# ==============================================================================================
# Soft MoE
# ==============================================================================================


def test_soft_routing_hand_case():
  # Tokens [3, 0] and [0, 2] normalise to e1 and e2; slots are the columns of the identity
  # (E=2 experts, P=1), so logits = I (up to the 1e-6 in the rsqrt).
  x = jnp.array([[3.0, 0.0], [0.0, 2.0]])
  routing = route_soft(x, jnp.eye(2), jnp.float32(1.0))
  big, small = math.e / (1 + math.e), 1 / (1 + math.e)  # softmax([1, 0]) = [0.731, 0.269]
  expected = [[big, small], [small, big]]
  np.testing.assert_allclose(routing.dispatch_weights, expected, rtol=1e-5)
  np.testing.assert_allclose(routing.combine_weights, expected, rtol=1e-5)
  # scale 2 doubles the logits: softmax([2, 0]) = [e^2, 1] / (e^2 + 1) = [0.881, 0.119]
  sharp = route_soft(x, jnp.eye(2), jnp.float32(2.0))
  np.testing.assert_allclose(sharp.dispatch_weights[0, 0], math.e**2 / (math.e**2 + 1), rtol=1e-5)
  np.testing.assert_allclose(routing.metrics["dispatch_max_weight"], big, rtol=1e-5)
  assert routing.aux_losses == {}


def test_soft_routing_weights_are_normalised():
  rng = np.random.default_rng(3)
  num_tokens, dim, slots = 7, 8, 6
  routing = route_soft(normal(rng, num_tokens, dim), normal(rng, dim, slots), jnp.float32(5.0))
  # Each slot is a convex mix of tokens; each token a convex mix of slots.
  np.testing.assert_allclose(np.sum(routing.dispatch_weights, axis=0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.sum(routing.combine_weights, axis=1), 1.0, rtol=1e-6)
  assert bool(jnp.all(routing.dispatch_weights > 0)) and bool(jnp.all(routing.combine_weights > 0))


def make_soft_router(num_experts, dim, slots):
  return soft_moe.SoftMoERouter.make(
    d_model=dim, num_experts=num_experts, top_k=1, rngs=nnx.Rngs(0), slots_per_expert=slots
  )


@functools.partial(nnx.jit, static_argnames=("num_experts",))
def soft_forward(router, x, w_in, w_out, *, num_experts):
  routing = router(x, train=True)
  y, _ = soft.soft_moe(x, routing, batched_expert_fn(w_in, w_out), num_experts=num_experts)
  return y, routing


def reference_soft_moe(x_gsd, phi_dn, scale, w_in, w_out, slots):
  """Loops over groups, experts and slots: X~ = normalised X, logits = X~ (scale Phi~)."""
  num_experts = w_in.shape[0]
  out = np.zeros_like(x_gsd, dtype=np.float64)
  norm = lambda v, axis: v / np.sqrt(np.sum(v * v, axis=axis, keepdims=True) + 1e-6)
  for g, x in enumerate(x_gsd.astype(np.float64)):
    logits = norm(x, 1) @ (scale * norm(phi_dn.astype(np.float64), 0))  # [S, E*P]
    dispatch = np_softmax(logits, axis=0)  # per slot, over tokens
    combine = np_softmax(logits, axis=1)  # per token, over slots
    slot_in = dispatch.T @ x  # [E*P, D] = D^T X
    slot_out = np.zeros_like(slot_in)
    for e in range(num_experts):
      for p in range(slots):
        n = e * slots + p  # slot n belongs to expert n // P
        slot_out[n] = np_expert(slot_in[n], w_in[e], w_out[e])
    out[g] = combine @ slot_out  # Y = C (slot outputs)
  return out


@pytest.mark.parametrize("slots", [1, 3])
def test_soft_moe_matches_loop_reference(slots):
  num_groups, num_tokens, num_experts, dim, hidden = 2, 6, 2, 8, 5
  rng = np.random.default_rng(slots)
  x = normal(rng, num_groups, num_tokens, dim)
  w_in, w_out = expert_weights(rng, num_experts, dim, hidden)
  router = make_soft_router(num_experts, dim, slots)
  router.scale[...] = jnp.float32(3.0)  # a non-default scale, to check where it multiplies
  assert router.phi.shape == (dim, num_experts * slots) and router.phi.axes == ("embed", None)
  y, routing = soft_forward(router, x, w_in, w_out, num_experts=num_experts)
  assert routing.dispatch_weights.shape == (num_groups, num_tokens, num_experts * slots)
  np.testing.assert_allclose(np.sum(routing.dispatch_weights, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.sum(routing.combine_weights, axis=2), 1.0, rtol=1e-6)
  ref = reference_soft_moe(x, np.asarray(router.phi[...]), 3.0, w_in, w_out, slots)
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_soft_moe_is_permutation_equivariant():
  num_tokens, num_experts, dim = 9, 3, 8
  rng = np.random.default_rng(4)
  x = normal(rng, 1, num_tokens, dim)
  w_in, w_out = expert_weights(rng, num_experts, dim, 5)
  router = make_soft_router(num_experts, dim, 2)
  perm = rng.permutation(num_tokens)
  y, _ = soft_forward(router, x, w_in, w_out, num_experts=num_experts)
  y_perm, _ = soft_forward(router, x[:, perm], w_in, w_out, num_experts=num_experts)
  np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-6)


def test_soft_moe_gradients_reach_phi_and_scale():
  num_experts, dim = 2, 8
  rng = np.random.default_rng(5)
  x = normal(rng, 2, 6, dim)
  w_in, w_out = expert_weights(rng, num_experts, dim, 5)
  cotangent = normal(rng, *x.shape)
  router = make_soft_router(num_experts, dim, 2)
  assert not soft_moe.SoftMoERouter.causal_in_sequence(router.options, MOE_SETTINGS)
  assert routers.get("soft_moe") is soft_moe.SoftMoERouter

  @nnx.jit
  def grads(router):
    def loss(router):
      routing = router(x, train=True)
      fn = batched_expert_fn(w_in, w_out)
      y, _ = soft.soft_moe(x, routing, fn, num_experts=num_experts)
      return jnp.sum(y * cotangent)

    return nnx.grad(loss)(router)

  g = grads(router)
  for grad in (g.phi[...], g.scale[...]):
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


# ==============================================================================================
# Through the MoE layer, and end to end
# ==============================================================================================


@pytest.mark.parametrize("name", ["expert_choice", "soft_moe"])
def test_moe_layer_position_layout(name):
  batch, length, dim, num_experts = 4, 3, 8, 2
  rngs = nnx.Rngs(0)
  options = {"slots_per_expert": 2} if name == "soft_moe" else {}
  settings = base.MoESettings(
    num_experts=num_experts,
    top_k=1,
    group_size=batch,
    group_layout="position",
    capacity_factor=2.0,
    eval_capacity_factor=2.0,
  )
  router = routers.get(name).make(d_model=dim, rngs=rngs, **vars(settings), **options)
  experts = ExpertBank(num_experts, dim, 6, activation="gelu", init_std=0.5, out_std=0.5, rngs=rngs)
  layer = MoELayer(router=router, experts=experts, settings=settings)
  x = jnp.asarray(normal(np.random.default_rng(6), batch, length, dim))
  call = nnx.jit(lambda m, x: m(x, train=False, rng=None))
  y, _, metrics = call(layer, x)
  # Position layout: one group per position; each group holds the 4 sequences' tokens there,
  # so running one position alone gives the same output.
  for pos in range(length):
    y_pos, _, _ = call(layer, x[:, pos : pos + 1])
    np.testing.assert_allclose(y[:, pos], y_pos[:, 0], atol=1e-6)
  if name == "expert_choice":
    assert float(metrics["dropped_fraction"]) == 0.0
  routing = nnx.eval_shape(lambda r: r(x, train=False), router)
  assert isinstance(routing, base.SoftRouting) == (name == "soft_moe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("name", ["expert_choice", "soft_moe"])
def test_end_to_end_train_on_8_devices(corpus, tmp_path, name):
  cfg = tiny_config(corpus, data=2, expert=4)
  moe = cfg.model.moe
  moe.router, moe.group_layout, moe.group_size = name, "position", 8  # batch 8
  moe.capacity_factor = moe.eval_capacity_factor = 2.0
  moe.soft_moe.slots_per_expert = 2
  cfg.train.steps = cfg.train.eval_every = cfg.train.checkpoint_every = 6
  out = train.run(cfg, str(tmp_path / name), progress=False)
  losses = np.array([out["losses"][s] for s in sorted(out["losses"])])
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]


def test_soft_router_init_scale_sets_the_learned_scale_and_sharpens_routing():
  """`init_scale` is the scale's starting value; with it the logits, and so the weights, sharpen."""
  rng = np.random.default_rng(5)
  x = normal(rng, 2, 16, 8)  # [G, S, D]

  def build(init_scale):
    return soft_moe.SoftMoERouter.make(
      d_model=8, num_experts=4, top_k=1, rngs=nnx.Rngs(0), slots_per_expert=2, init_scale=init_scale
    )

  flat, sharp = build(1.0), build(10.0)
  assert float(flat.scale[...]) == 1.0 and float(sharp.scale[...]) == 10.0
  np.testing.assert_array_equal(flat.phi[...], sharp.phi[...])  # same init stream, same slots
  r_flat, r_sharp = flat(x, train=True), sharp(x, train=True)
  # Same cosines times 10: the largest weights of both softmaxes grow.
  assert r_sharp.metrics["combine_max_weight"] > r_flat.metrics["combine_max_weight"] + 0.1
  assert r_sharp.metrics["dispatch_max_weight"] > r_flat.metrics["dispatch_max_weight"] + 0.1
  with pytest.raises(ValueError, match="init_scale=0.0: must be > 0"):
    build(0.0)
