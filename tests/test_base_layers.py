"""BASE layers: the balanced-assignment solver against an exact solver, and the router."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import errors, train
from moejax import metrics as metrics_lib
from moejax.model.experts import ExpertBank
from moejax.model.moe_layer import MoELayer
from moejax.model.routers import base, base_layers
from moejax.ops import balanced_assignment as ba
from tests.helpers import tiny_config, write_corpus

# Jitted once per shape: on CPU, one compile beats compiling every primitive eagerly.
auction = jax.jit(ba.auction_assignment, static_argnums=1)
route = jax.jit(base_layers.route_base, static_argnames=("train", "num_iterations"))


def total(scores, expert_s):
  return float(np.asarray(scores, np.float64)[np.arange(len(expert_s)), expert_s].sum())


def hungarian_min_cost(cost):
  """Minimum-cost perfect matching of a square matrix (Hungarian algorithm with potentials,
  O(n^3)); returns the column matched to each row."""
  n = cost.shape[0]
  u, v = np.zeros(n + 1), np.zeros(n + 1)
  row_of_col = np.zeros(n + 1, dtype=int)  # 1-based row matched to column j; 0 = free
  way = np.zeros(n + 1, dtype=int)
  for i in range(1, n + 1):
    row_of_col[0], j0 = i, 0
    min_v = np.full(n + 1, np.inf)
    used = np.zeros(n + 1, dtype=bool)
    while True:  # grow an alternating tree from row i until it reaches a free column
      used[j0] = True
      i0 = row_of_col[j0]
      reduced = cost[i0 - 1] - u[i0] - v[1:]
      free = ~used[1:]
      better = free & (reduced < min_v[1:])
      min_v[1:][better] = reduced[better]
      way[1:][better] = j0
      candidates = np.where(free, min_v[1:], np.inf)
      j1 = int(np.argmin(candidates)) + 1
      delta = candidates[j1 - 1]
      u[row_of_col[used]] += delta
      v[used] -= delta
      min_v[1:][free] -= delta
      j0 = j1
      if row_of_col[j0] == 0:
        break
    while j0:  # flip the augmenting path
      j1 = way[j0]
      row_of_col[j0] = row_of_col[j1]
      j0 = j1
  col_of_row = np.zeros(n, dtype=int)
  col_of_row[row_of_col[1:] - 1] = np.arange(n)
  return col_of_row


def exact_balanced(scores):
  """The optimal balanced assignment: expand expert e into S/E identical slot columns, solve the
  S x S assignment exactly, map slots back to experts."""
  num_tokens, num_experts = scores.shape
  quota = num_tokens // num_experts
  slots = np.repeat(np.asarray(scores, np.float64), quota, axis=1)  # column j = expert j // quota
  return hungarian_min_cost(-slots) // quota


def brute_force_balanced_total(scores):
  """Best total over every balanced assignment, by enumeration (tiny sizes only)."""
  num_tokens, num_experts = scores.shape
  quota = num_tokens // num_experts
  best = -np.inf
  for perm in itertools.permutations(range(num_tokens)):
    best = max(best, total(scores, np.array(perm) // quota))
  return best


def random_scores(rng, num_tokens, num_experts, kind):
  """float32 scores: Gaussian or affinities x . w of rank 8 (both tie-free), or "repeated": the
  rows of 4 Gaussian tokens, repeated (equal tokens: the auction's hard case)."""
  if kind == "gauss":
    return rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  if kind == "repeated":
    rows = rng.normal(size=(4, num_experts)).astype(np.float32)
    return rows[rng.integers(0, 4, size=num_tokens)]
  x = rng.normal(size=(num_tokens, 8))
  return (x @ rng.normal(size=(8, num_experts))).astype(np.float32)


# ==============================================================================================
# The solver
# ==============================================================================================


def test_exact_solver_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(4):
    scores = rng.normal(size=(6, 3))
    assert total(scores, exact_balanced(scores)) == pytest.approx(
      brute_force_balanced_total(scores)
    )


# Greedy (each token's best expert) puts all four tokens on e0; each expert must take 2.
# Cost of moving a token to e1: 4-0=4, 3-2=1, 2-1.5=0.5, 1-0.2=0.8: move t2 and t3.
# Optimum [0, 0, 1, 1]: 4 + 3 + 1.5 + 0.2 = 8.7 (next best [0, 1, 1, 0]: 4 + 2 + 1.5 + 1 = 8.5).
HAND = np.array([[4.0, 0.0], [3.0, 2.0], [2.0, 1.5], [1.0, 0.2]], np.float32)


def test_hand_case_balanced_differs_from_greedy():
  expert_s, optimal = auction(HAND, 100)
  np.testing.assert_array_equal(expert_s, [0, 0, 1, 1])
  assert bool(optimal)
  np.testing.assert_array_equal(np.argmax(HAND, axis=1), [0, 0, 0, 0])


def test_solver_beats_the_greedy_repair_alone():
  # Both tokens prefer e0. With 0 iterations only the greedy repair runs and gives e0 to the
  # higher score: t0 -> e0, t1 -> e1, total 10 + 0 = 10. The optimum swaps them: 9 + 9 = 18.
  scores = np.array([[10.0, 9.0], [9.0, 0.0]], np.float32)
  repaired, optimal = auction(scores, 0)
  np.testing.assert_array_equal(repaired, [0, 1])
  assert not bool(optimal)
  np.testing.assert_array_equal(auction(scores, 100)[0], [1, 0])


def test_cycle_cancelling_finds_a_three_cycle():
  # One token per expert, starting on the diagonal (total 0). Every swap of two tokens loses
  # (e.g. t0 <-> t1: 1 - 5 + 0 = -4); only the 3-cycle t0 -> e1, t1 -> e2, t2 -> e0 gains 3.
  # Edge weights W[i, j] = a[t_i, i] - a[t_i, j]: W[0, 1] = W[1, 2] = W[2, 0] = -1, others 5.
  scores = jnp.array([[0.0, 1.0, -5.0], [-5.0, 0.0, 1.0], [1.0, -5.0, 0.0]])
  start = jnp.array([0, 1, 2], jnp.int32)
  cancel = jax.jit(ba._cancel_negative_cycles, static_argnums=2)
  expert_s, optimal = cancel(scores, start, 1)
  np.testing.assert_array_equal(expert_s, [1, 2, 0])
  assert not bool(optimal)  # one step allowed: not yet checked that no cycle is left
  expert_s, optimal = cancel(scores, start, 10)
  np.testing.assert_array_equal(expert_s, [1, 2, 0])
  assert bool(optimal)


@pytest.mark.parametrize("num_tokens, num_experts", [(16, 4), (32, 8), (64, 16)])
def test_matches_exact_solver(num_tokens, num_experts):
  rng = np.random.default_rng(num_tokens + num_experts)
  for kind in ("gauss", "lowrank", "repeated"):
    for _ in range(3):
      scores = random_scores(rng, num_tokens, num_experts, kind)
      expert_s, optimal = auction(scores, 100)
      expert_s = np.asarray(expert_s)
      np.testing.assert_array_equal(
        np.bincount(expert_s, minlength=num_experts), num_tokens // num_experts
      )
      assert bool(optimal)
      optimum = total(scores, exact_balanced(scores))
      assert total(scores, expert_s) == pytest.approx(optimum, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("num_iterations", [0, 3])  # 100: see test_matches_exact_solver
def test_quotas_are_exact_even_when_not_optimal(num_iterations):
  rng = np.random.default_rng(num_iterations)
  cases = [random_scores(rng, 48, 6, "gauss"), random_scores(rng, 48, 6, "lowrank")]
  cases.append(np.round(cases[0]).astype(np.float32))  # many ties
  cases.append(np.zeros((48, 6), np.float32))  # all tied
  cases.append(np.tile(np.arange(6, dtype=np.float32), (48, 1)))  # everyone wants e5
  for scores in cases:
    expert_s = np.asarray(auction(scores, num_iterations)[0])
    np.testing.assert_array_equal(np.bincount(expert_s, minlength=6), [8] * 6)


def test_permutation_equivariance():
  rng = np.random.default_rng(3)
  scores = random_scores(rng, 32, 8, "lowrank")
  tokens, experts = rng.permutation(32), rng.permutation(8)
  permuted = scores[tokens][:, experts]
  expert_s = np.asarray(auction(scores, 100)[0])
  expert_p = np.asarray(auction(permuted, 100)[0])
  assert total(permuted, expert_p) == pytest.approx(total(scores, expert_s), rel=1e-6)
  # Tie-free scores have a unique optimum: the same assignment, relabelled.
  np.testing.assert_array_equal(experts[expert_p], expert_s[tokens])


def test_rejects_group_not_divisible_by_experts_and_handles_one_expert():
  with pytest.raises(ValueError, match="num_tokens % num_experts"):
    ba.balanced_assignment(jnp.zeros((10, 4)))
  np.testing.assert_array_equal(ba.balanced_assignment(jnp.ones((3, 1))), [0, 0, 0])


# ==============================================================================================
# The router
# ==============================================================================================


@pytest.mark.parametrize(
  "cf, expected",
  [(1.0, 2), (1.25, 3), (0.5, 2), (8.0, 16), (100.0, 16)],  # S=16, E=8: S/E = 2, clip to [2, 16]
)
def test_capacity(cf, expected):
  assert base_layers.base_capacity(16, 8, cf) == expected


def test_route_train_is_balanced_with_sigmoid_gates():
  routing = route(jnp.asarray(HAND), train=True, num_iterations=100)
  np.testing.assert_array_equal(routing.token_index, [0, 1, 2, 3])
  np.testing.assert_array_equal(routing.expert_index, [0, 0, 1, 1])
  assert bool(np.all(routing.valid))
  # Gates: sigmoid of the chosen affinities 4, 3, 1.5, 0.2.
  gates = 1 / (1 + np.exp(-np.array([4.0, 3.0, 1.5, 0.2])))
  np.testing.assert_allclose(routing.combine_weight, gates, rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["expert_load"], [0.5, 0.5])
  # assigned 8.7, greedy 4 + 3 + 2 + 1 = 10, worst 0 + 2 + 1.5 + 0.2 = 3.7:
  # (8.7 - 3.7) / (10 - 3.7) = 5 / 6.3
  np.testing.assert_allclose(routing.metrics["affinity_ratio"], 5 / 6.3, rtol=1e-5)
  assert routing.aux_losses == {}


def test_route_eval_is_greedy_top1():
  logits = random_scores(np.random.default_rng(4), 16, 4, "gauss")
  routing = route(jnp.asarray(logits), train=False, num_iterations=100)
  best = np.argmax(logits, axis=1)
  np.testing.assert_array_equal(routing.expert_index, best)
  np.testing.assert_allclose(routing.combine_weight, 1 / (1 + np.exp(-logits.max(1))), rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["expert_load"], np.bincount(best, minlength=4) / 16)
  assert float(routing.metrics["affinity_ratio"]) == pytest.approx(1.0, abs=1e-6)


def test_centroids_learn_only_through_the_gate():
  dim, num_experts, groups, tokens = 6, 4, 2, 8
  rng = np.random.default_rng(5)
  router = base_layers.BaseLayersRouter.make(
    d_model=dim, num_experts=num_experts, top_k=1, rngs=nnx.Rngs(0), init_std=0.5
  )
  x = jnp.asarray(rng.normal(size=(groups, tokens, dim)).astype(np.float32))
  c = jnp.asarray(rng.normal(size=(groups, tokens)).astype(np.float32))

  @nnx.jit
  def grad_through_router(router):
    def loss(router):
      routing = router(x, train=True)
      return jnp.sum(c * routing.combine_weight), routing.expert_index

    return nnx.grad(loss, has_aux=True)(router)

  grads, expert_gs = grad_through_router(router)
  expert_gs = np.asarray(expert_gs)
  for g in range(groups):  # balanced in training: 2 tokens per expert in each group
    np.testing.assert_array_equal(np.bincount(expert_gs[g], minlength=num_experts), [2] * 4)

  # The gate path alone, with the experts held fixed: d/dw_e sum_s c_s sigmoid(x_s . w_e(s))
  # = sum over the tokens s on expert e of c_s g_s (1 - g_s) x_s.
  w = np.asarray(router.centroids[...], np.float64)
  xs = np.asarray(x, np.float64)
  expected = np.zeros_like(w)
  for g in range(groups):
    for s in range(tokens):
      e = expert_gs[g, s]
      gate = 1 / (1 + np.exp(-xs[g, s] @ w[:, e]))
      expected[:, e] += float(c[g, s]) * gate * (1 - gate) * xs[g, s]
  np.testing.assert_allclose(grads.centroids[...], expected, rtol=1e-4, atol=1e-6)
  assert np.abs(expected).sum() > 0


def test_moe_layer_drops_nothing_in_train_and_eval():
  batch, length, dim, num_experts = 8, 2, 8, 4
  rngs = nnx.Rngs(0)
  settings = base.MoESettings(
    num_experts=num_experts,
    top_k=1,
    group_size=batch,
    group_layout="position",
    capacity_factor=1.0,
    eval_capacity_factor=num_experts,
  )
  router = base_layers.BaseLayersRouter.make(d_model=dim, rngs=rngs, **vars(settings))
  experts = ExpertBank(num_experts, dim, 6, activation="gelu", init_std=0.5, out_std=0.5, rngs=rngs)
  layer = MoELayer(router=router, experts=experts, settings=settings)
  # Every token aligned with centroid 0: greedy eval sends the whole group to expert 0.
  w0 = np.asarray(router.centroids[...])[:, 0]
  x = jnp.asarray(np.broadcast_to(10 * w0 / np.linalg.norm(w0), (batch, length, dim)))
  call = nnx.jit(lambda m, x, train: m(x, train=train, rng=None), static_argnames="train")
  for train_mode, load in ((True, [0.25] * 4), (False, [1.0, 0.0, 0.0, 0.0])):
    y, losses, metrics = call(layer, x, train_mode)
    assert losses == {}
    np.testing.assert_allclose(metrics["expert_load"], load)
    assert float(metrics["dropped_fraction"]) == 0.0
    assert np.all(np.abs(np.asarray(y)) > 0)  # every token got its expert's output


def test_router_rejects_top_k_above_one_and_bad_group():
  with pytest.raises(ValueError, match="one expert per token"):
    base_layers.BaseLayersRouter.make(d_model=4, num_experts=2, top_k=2, rngs=nnx.Rngs(0))
  router = base_layers.BaseLayersRouter.make(d_model=4, num_experts=4, top_k=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of num_experts"):
    router(jnp.zeros((1, 6, 4)), train=True)
  cls, settings = base_layers.BaseLayersRouter, base.MoESettings(4, 1, 6)
  assert not cls.causal_in_sequence(router.options, settings)
  with pytest.raises(errors.ConfigError, match="group_size=6 to be a multiple of"):
    cls.check(router.options, settings)
  assert "group_layout='position'" in cls.decode_refusal(router.options, settings)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_end_to_end_train_on_8_devices(corpus, tmp_path):
  cfg = tiny_config(corpus, data=2, expert=4)
  moe = cfg.model.moe
  moe.router, moe.group_layout, moe.group_size = "base", "position", 8  # batch 8, 4 experts
  moe.capacity_factor, moe.eval_capacity_factor = 1.0, 4.0
  cfg.train.steps = cfg.train.eval_every = cfg.train.checkpoint_every = 6
  out = train.run(cfg, str(tmp_path / "base"), progress=False)
  losses = np.array([out["losses"][s] for s in sorted(out["losses"])])
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  lines = [line for line in metrics_lib.read_metrics(str(tmp_path / "base")) if "loss" in line]
  for line in lines:  # training routes are exactly balanced and nothing is dropped
    np.testing.assert_allclose(line["layer_1/expert_load"], [0.25] * 4, atol=1e-6)
    assert line["layer_1/dropped_fraction"] == 0.0
    assert line["layer_1/assignment_optimal"] == 1.0
