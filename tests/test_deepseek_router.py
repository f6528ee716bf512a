"""DeepSeek-V3 routing: biased selection, bias update, group-limited routing, shared experts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import errors
from moejax.model.experts import ExpertBank
from moejax.model.layers import DenseMLP
from moejax.model.moe_layer import MoELayer
from moejax.model.routers import base, deepseek

route = jax.jit(
  deepseek.route_deepseek,
  static_argnames=("top_k", "route_scale", "num_expert_groups", "top_expert_groups"),
)
balance_loss = jax.jit(deepseek.sequence_balance_loss, static_argnames=("top_k",))


def logit(s):
  """Inverse sigmoid, so that sigmoid(logit(s)) == s up to float32 rounding."""
  s = np.asarray(s, np.float64)
  return np.log(s / (1.0 - s)).astype(np.float32)


def reference_route(scores_se, bias_e, k, num_groups=1, top_groups=1):
  """Per token, by python sorts: groups by top-2 sum, then top-k; pairs choice-rank-major."""
  num_tokens, num_experts = scores_se.shape
  per_group = num_experts // num_groups
  chosen = []
  for s in range(num_tokens):
    select = [float(scores_se[s, e] + bias_e[e]) for e in range(num_experts)]
    group_score = [
      sum(sorted(select[g * per_group : (g + 1) * per_group], reverse=True)[:2])
      for g in range(num_groups)
    ]
    groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:top_groups]
    allowed = [e for e in range(num_experts) if e // per_group in groups]
    chosen.append(sorted(allowed, key=lambda e: -select[e])[:k])
  experts = np.array([chosen[s][r] for r in range(k) for s in range(num_tokens)])
  gates = np.array(
    [
      scores_se[s, chosen[s][r]] / sum(scores_se[s, e] for e in chosen[s])
      for r in range(k)
      for s in range(num_tokens)
    ]
  )
  return experts, gates


# ----------------------------------------------------------------------------------------------
# selection and weights

# Two tokens, four experts, sigmoid affinities s.
SCORES = np.array([[0.9, 0.8, 0.3, 0.1], [0.2, 0.6, 0.5, 0.7]], np.float32)
BIAS = np.array([0.0, -0.6, 0.55, 0.0], np.float32)


def test_selection_without_bias():
  r = route(jnp.asarray(logit(SCORES)), jnp.zeros(4), top_k=2)
  # token 0: s = [.9, .8, .3, .1] -> e0, e1; weights .9/1.7, .8/1.7
  # token 1: s = [.2, .6, .5, .7] -> e3, e1; weights .7/1.3, .6/1.3
  # pairs choice-rank-major: (t0 1st, t1 1st, t0 2nd, t1 2nd)
  np.testing.assert_array_equal(r.token_index, [0, 1, 0, 1])
  np.testing.assert_array_equal(r.expert_index, [0, 3, 1, 1])
  np.testing.assert_allclose(r.combine_weight, [0.9 / 1.7, 0.7 / 1.3, 0.8 / 1.7, 0.6 / 1.3], 1e-5)
  assert r.valid.all() and r.combine_weight.dtype == jnp.float32


def test_bias_changes_choice_not_weights():
  r = route(jnp.asarray(logit(SCORES)), jnp.asarray(BIAS), top_k=2, route_scale=2.5)
  # token 0: s + b = [.9, .2, .85, .1] -> e0, e2; weights from s: .9/1.2 = .75, .3/1.2 = .25
  # token 1: s + b = [.2, .0, 1.05, .7] -> e2, e3; weights .5/1.2, .7/1.2
  # route_scale 2.5 multiplies every weight, so each token's weights sum to 2.5.
  np.testing.assert_array_equal(r.expert_index, [0, 2, 2, 3])
  expected = 2.5 * np.array([0.75, 0.5 / 1.2, 0.25, 0.7 / 1.2])
  np.testing.assert_allclose(r.combine_weight, expected, rtol=1e-5)
  per_token = np.zeros(2)
  np.add.at(per_token, np.asarray(r.token_index), np.asarray(r.combine_weight))
  np.testing.assert_allclose(per_token, [2.5, 2.5], rtol=1e-6)


@pytest.mark.parametrize(
  "num_groups,top_groups,k", [(1, 1, 3), (4, 2, 3), (4, 1, 2), (8, 3, 4), (16, 5, 5)]
)
def test_group_limited_routing_matches_brute_force(num_groups, top_groups, k):
  rng = np.random.default_rng(num_groups * 10 + top_groups)
  logits = rng.normal(size=(12, 16)).astype(np.float32)
  bias = rng.normal(scale=0.2, size=16).astype(np.float32)
  r = route(
    jnp.asarray(logits),
    jnp.asarray(bias),
    top_k=k,
    num_expert_groups=num_groups,
    top_expert_groups=top_groups,
  )
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))
  experts, gates = reference_route(scores, bias, k, num_groups, top_groups)
  np.testing.assert_array_equal(r.expert_index, experts)
  np.testing.assert_allclose(r.combine_weight, gates, rtol=1e-5)
  if num_groups > 1:  # every token's experts lie in at most top_groups groups
    groups = np.asarray(r.expert_index).reshape(k, 12) // (16 // num_groups)
    assert max(len(set(groups[:, s])) for s in range(12)) <= top_groups


def test_rejects_unreachable_top_k():
  with pytest.raises(ValueError, match="reachable"):
    deepseek.DeepSeekRouter.make(
      d_model=4, num_experts=8, top_k=3, num_expert_groups=4, top_expert_groups=1, rngs=nnx.Rngs(0)
    )
  with pytest.raises(ValueError, match="divide"):
    deepseek.DeepSeekRouter.make(
      d_model=4, num_experts=8, top_k=1, num_expert_groups=3, rngs=nnx.Rngs(0)
    )
  # The same checks on a config, as one-line config errors.
  options = deepseek.DeepSeekOptions(num_expert_groups=4, top_expert_groups=1)
  with pytest.raises(errors.ConfigError, match="model.moe.router='deepseek': .*reachable"):
    deepseek.DeepSeekRouter.check(options, base.MoESettings(num_experts=8, top_k=3, group_size=8))


def test_causal_in_sequence_for_top_1_or_dropless():
  causal = lambda k, dispatch: deepseek.DeepSeekRouter.causal_in_sequence(
    deepseek.DeepSeekOptions(), base.MoESettings(8, k, 8, dispatch=dispatch)
  )
  assert causal(1, "capacity") and not causal(2, "capacity") and not causal(2, "all_to_all")
  assert causal(2, "dropless")  # no capacity: a token's pairs never compete with later ones


# ----------------------------------------------------------------------------------------------
# sequence-wise balance loss


def test_sequence_balance_loss_hand_case():
  scores = np.array([[0.6, 0.2, 0.1, 0.1], [0.2, 0.2, 0.4, 0.2]], np.float32)
  chosen = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], np.float32)  # top-1: e0, e2
  # f = E / (k S) * count = 4 / 2 * [1, 0, 1, 0] = [2, 0, 2, 0]
  # rows sum to 1, so P = column means = [0.4, 0.2, 0.25, 0.15]
  # loss = 2 * 0.4 + 2 * 0.25 = 1.3
  np.testing.assert_allclose(balance_loss(scores, chosen, top_k=1), 1.3, rtol=1e-6)
  # Affinities are normalised per token first: doubling token 0's row changes nothing.
  doubled = scores * np.array([[2.0], [1.0]], np.float32)
  np.testing.assert_allclose(balance_loss(doubled, chosen, top_k=1), 1.3, rtol=1e-6)
  # The router reports the same value for these affinities (its own top-1 is e0, e2).
  r = route(jnp.asarray(logit(scores)), jnp.zeros(4), top_k=1)
  np.testing.assert_array_equal(r.expert_index, [0, 2])
  np.testing.assert_allclose(r.aux_losses["sequence_balance_loss"], 1.3, rtol=1e-5)


def test_sequence_balance_loss_is_one_at_balance():
  # k=2 of E=4, S=2: every expert chosen once, uniform affinities: f = 4/4 * 1, P = 1/4.
  scores = np.full((2, 4), 0.5, np.float32)
  chosen = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32)
  np.testing.assert_allclose(balance_loss(scores, chosen, top_k=2), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# the bias: update rule, no gradient, balancing


def make_router(gamma, *, d=8, e=4, k=2, std=1.0, **kw):
  return deepseek.DeepSeekRouter.make(
    d_model=d, num_experts=e, top_k=k, rngs=nnx.Rngs(0), bias_update_rate=gamma, init_std=std, **kw
  )


@functools.partial(nnx.jit, static_argnames=("train",))
def call_router(router, x, train):
  return router(x, train=train)


def test_bias_update_matches_numpy_over_steps():
  gamma, e, k = 0.05, 4, 2
  router = make_router(gamma, e=e, k=k)
  kernel = np.asarray(router.kernel[...], np.float64)
  bias, moved = np.zeros(e), 0.0
  rng = np.random.default_rng(0)
  for step in range(4):
    x = rng.normal(size=(3, 8, 8)).astype(np.float32)  # G=3 groups of S=8 tokens
    r = call_router(router, jnp.asarray(x), train=True)
    scores = 1.0 / (1.0 + np.exp(-(x @ kernel)))
    counts = np.zeros(e)
    for g in range(3):
      # Selection uses the bias from BEFORE this step's update.
      experts, _ = reference_route(scores[g], bias, k)
      np.testing.assert_array_equal(r.expert_index[g], experts, err_msg=f"{step=} {g=}")
      np.add.at(counts, experts, 1)
    np.testing.assert_allclose(r.metrics["balance_bias_max_abs"], np.abs(bias).max(), atol=1e-6)
    # load counted over ALL groups: 3 * 8 * 2 = 48 choices, mean 12 per expert
    bias = bias + gamma * np.sign(counts.mean() - counts)
    moved = max(moved, np.abs(bias).max())
    np.testing.assert_allclose(router.bias[...], bias, atol=1e-6, err_msg=f"{step=}")
    np.testing.assert_allclose(r.metrics["load_max_over_mean"], counts.max() / counts.mean())
  assert moved > 0  # the case exercised real updates
  # Evaluation routes with the bias but never changes it.
  call_router(router, jnp.asarray(x), train=False)
  np.testing.assert_allclose(router.bias[...], bias, atol=1e-6)


def test_bias_is_not_a_param_and_gets_no_gradient():
  router = make_router(0.1)
  graphdef, params, rest = nnx.split(router, nnx.Param, ...)
  assert set(nnx.to_pure_dict(params)) == {"kernel"}
  assert set(nnx.to_pure_dict(rest)) == {"bias"}
  assert isinstance(router.bias, deepseek.BalanceBias)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8))
  coef = jax.random.normal(jax.random.key(2), (2, 16))

  def loss(params, rest):
    r = nnx.merge(graphdef, params, rest)(x, train=True)
    # Weights of a token sum to 1, so weigh them by random coefficients to get a gradient.
    return jnp.sum(coef * r.combine_weight) + r.aux_losses["sequence_balance_loss"]

  g_params, g_rest = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, rest)
  assert float(jnp.abs(g_params["kernel"][...]).max()) > 1e-4  # gradients reach W_g
  np.testing.assert_array_equal(g_rest["bias"][...], np.zeros(4))


def test_bias_update_balances_load():
  """A fixed skewed router: the bias alone brings max/mean load from ~2.6 to ~1.2."""
  e, k = 8, 2

  def imbalance_curve(gamma):
    router = make_router(gamma, d=16, e=e, k=k, std=0.5)
    graphdef, params, rest = nnx.split(router, nnx.Param, ...)

    def step(rest, key):
      # Inputs with a common offset, so a few experts win for most tokens.
      x = jax.random.normal(key, (8, 64, 16)) + 1.0
      model = nnx.merge(graphdef, params, rest)
      r = model(x, train=True)
      return nnx.split(model, nnx.Param, ...)[2], r.metrics["load_max_over_mean"]

    keys = jax.random.split(jax.random.key(0), 150)
    _, curve = jax.jit(lambda rest: jax.lax.scan(step, rest, keys))(rest)
    return np.asarray(curve)

  frozen, balancing = imbalance_curve(0.0), imbalance_curve(0.01)
  # Same start (same kernel, zero bias, same inputs); gamma = 0 stays skewed.
  assert balancing[0] == frozen[0] and frozen[-20:].mean() > 2.0
  # 8 * 64 * 2 = 1024 choices, mean 128 per expert. Sign updates of size gamma keep the bias
  # oscillating around balance, so the busiest expert stays ~20% above the mean, not at it.
  assert balancing[-20:].mean() < min(1.5, 0.6 * frozen[-20:].mean()), balancing[-20:]


# ----------------------------------------------------------------------------------------------
# the layer: shared experts are added unweighted


def test_moe_layer_with_shared_experts_matches_loop():
  d, e, k, f, s = 8, 4, 2, 6, 8
  rngs = nnx.Rngs(3)
  router = make_router(0.0, d=d, e=e, k=k, route_scale=1.5)
  experts = ExpertBank(e, d, f, activation="relu", init_std=0.3, out_std=0.3, rngs=rngs)
  shared = DenseMLP(d, 2 * f, activation="relu", init_std=0.3, out_std=0.3, rngs=rngs)
  settings = base.MoESettings(
    num_experts=e, top_k=k, group_size=s, capacity_factor=float(e), eval_capacity_factor=float(e)
  )
  layer = MoELayer(router=router, experts=experts, settings=settings, shared_experts=shared)
  x = jax.random.normal(jax.random.key(4), (2, 8, d))
  y, aux, metrics = nnx.jit(lambda m, x: m(x, train=True, rng=None))(layer, x)
  assert set(aux) == {"sequence_balance_loss"} and float(metrics["dropped_fraction"]) == 0.0

  # Reference: per token, route_scale-weighted top-k experts plus the two shared halves.
  win, wout = np.asarray(experts.w_in[...]), np.asarray(experts.w_out[...])
  sin, sout = np.asarray(shared.w_in[...]), np.asarray(shared.w_out[...])
  xt = np.asarray(x).reshape(-1, d)
  scores = 1.0 / (1.0 + np.exp(-(xt @ np.asarray(router.kernel[...]))))
  expected = np.zeros_like(xt)
  for t in range(xt.shape[0]):
    chosen, gates = reference_route(scores[t : t + 1], np.zeros(e), k)
    for ex, gate in zip(chosen, gates, strict=True):
      expected[t] += 1.5 * gate * (np.maximum(xt[t] @ win[ex], 0) @ wout[ex])
    for h in (slice(0, f), slice(f, 2 * f)):  # width 2f == two shared experts of width f, summed
      expected[t] += np.maximum(xt[t] @ sin[:, h], 0) @ sout[h]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, d), expected, rtol=1e-4, atol=1e-5)
  assert math.isclose(float(metrics["expert_load"].sum()), 1.0, rel_tol=1e-5)


def test_recipe_configs_validate():
  import importlib.util

  from moejax import config_lib

  def load(name):
    spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  deepseek_cfg, switch_cfg = load("deepseek_moe"), load("switch_base")
  full = deepseek_cfg.get_config()
  assert config_lib.validate(full, 8)["data"] == 8
  assert (full.model.moe.num_experts, full.model.moe.top_k, full.model.moe.d_expert) == (64, 6, 768)
  tiny, switch_tiny = deepseek_cfg.get_config("tiny"), switch_cfg.get_config("tiny")
  config_lib.validate(tiny, 8)
  for key in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "activation"):
    assert tiny.model[key] == switch_tiny.model[key], key
  assert tiny.train.to_dict() == switch_tiny.train.to_dict()
  # 16 experts of d_ff / 4, top-4, + 1 shared: 5 quarter-FFNs per token vs Switch's 1 full FFN.
  assert (tiny.model.moe.num_experts, tiny.model.moe.top_k, tiny.model.moe.d_expert) == (16, 4, 128)


# ----------------------------------------------------------------------------------------------
# end to end: the bias is train state, logged loads explain it, and it survives a resume


def test_train_resume_keeps_bias(tmp_path):
  from moejax import metrics as metrics_lib
  from moejax import train
  from tests.helpers import tiny_config, write_corpus

  cfg = tiny_config(write_corpus(tmp_path), data=2, expert=4)
  moe, gamma = cfg.model.moe, 0.01
  moe.router, moe.top_k, moe.num_shared_experts = "deepseek", 2, 1
  moe.deepseek.bias_update_rate = gamma
  moe.group_layout, moe.group_size = "position", 8  # k=2 is causal across sequences only
  # Stop at an odd step: an odd number of +-gamma steps cannot sum to a zero bias.
  cfg.train.steps, cfg.train.eval_every = 7, 7
  workdir = str(tmp_path / "run")
  bias_of = lambda out: np.asarray(
    out["state"]["model_state"]["blocks"][1]["ffn"]["router"]["bias"]
  )

  first = train.run(cfg, workdir, progress=False, stop_at=3)
  second = train.run(cfg, workdir, progress=False)  # resumes from the step-3 checkpoint
  assert min(second["losses"]) == 4
  losses = np.array([first["losses"][1], second["losses"][7]])
  assert np.all(np.isfinite(losses)) and losses[1] < losses[0]

  # Rebuild the bias from the logged per-step loads of both runs: 8 sequences * 32 tokens * k=2
  # = 512 choices a step, mean 128 per expert; b += gamma * sign(128 - count) = sign(512 - 4 count).
  lines = [line for line in metrics_lib.read_metrics(workdir) if "loss" in line]
  assert [line["step"] for line in lines] == list(range(1, 8))
  bias = np.zeros(4, np.float32)
  for step, line in enumerate(lines, start=1):
    counts = np.round(np.array(line["layer_1/expert_load"]) * 512)
    assert counts.sum() == 512
    bias = bias + np.float32(gamma) * np.sign(512 - 4 * counts).astype(np.float32)
    if step == 3:
      np.testing.assert_array_equal(bias_of(first), bias)
      assert np.any(bias != 0)
  # Had the resume restarted from b = 0, the final bias would be this sum minus the nonzero
  # step-3 bias: equality means the checkpointed bias carried on exactly.
  np.testing.assert_array_equal(bias_of(second), bias)
