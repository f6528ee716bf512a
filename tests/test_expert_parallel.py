"""Expert parallelism, proven on the compiled train step (8 simulated devices).

- Whole-step collective bytes / the analytic minimum <= 1.3, replicated work <= 1.1 and no XLA
  "Involuntary full rematerialization" for every recipe's tiny preset and the five meshes
  (benchmarks/collectives.py measures, benchmarks/collective_model.py is the minimum). On meshes
  with an FSDP axis, XLA:CPU reduces FSDP gradients with an all-reduce whose result is sliced
  to the shard (XLA's GPU pipeline rewrites that pair into a reduce-scatter, half the bytes):
  there the 1.3 bound applies with those all-reduces counted as the reduce-scatters they are,
  the bytes as compiled for CPU stay under 1.4, and the FSDP all-gathers are at the minimum.
  Expert-parallel dropless computes its static exchange bound's idle rows too: replicated work
  <= 1.1 with a bound of 1.0, <= 1.15 at the default exchange_factor 2.0 (the dropless
  recipes too). Recipes with a known excess (KNOWN_EXCESS) are strict expected failures.
- Expert weights' gradients never leave their expert shard.
- Expert-parallel dropless: pairs over the static per-destination bound are dropped and
  counted, the rest equal a per-pair reference.
- The same losses on 1 and 8 devices for every dispatch and both group layouts.
"""

import dataclasses
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from benchmarks import collectives, hlo_collectives
from moejax import sharding, train, training
from moejax.model.experts import ExpertBank
from moejax.ops import dropless_dispatch
from moejax.ops.routing import SparseRouting
from tests.helpers import tiny_config, write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = {
  "dp2_ep4": dict(data=2, expert=4),
  "fsdp2_ep4": dict(fsdp=2, expert=4),
  "ep8": dict(expert=8),
  "dp2_fsdp2_ep2": dict(data=2, fsdp=2, expert=2),
  "dp2_ep2_tp2": dict(data=2, expert=2, tensor=2),
}
RECIPES = [p.stem for p in sorted((ROOT / "configs").glob("*.py"))]


def recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny(name: str, mesh: dict, dispatch: str | None = None):
  cfg = recipe(name).get_config("tiny")
  for axis in sharding.MESH_AXES:
    cfg.mesh[axis] = mesh.get(axis, 1)
  if dispatch:
    cfg.model.moe.dispatch = dispatch
  return cfg


def _has_tiny(name: str) -> bool:
  try:
    return recipe(name).get_config("tiny").model.moe_every > 0
  except Exception:  # noqa: BLE001 - recipes without a tiny MoE preset are not in this table
    return False


def _recipe_overrides(name: str) -> dict:
  """Dropless recipes (Mixtral, Qwen3) are measured with an exchange bound of 1.0: the default
  2.0's idle rows are a larger share of their FLOPs (wide experts, k = 2 and 4) than of
  switch_base's, so the 1.15 slack of the switch_base rows below does not carry over."""
  return {"exchange_factor": 1.0} if name in ("mixtral_8x7b", "qwen3_moe_30b_a3b") else {}


MOE_RECIPES = [name for name in RECIPES if _has_tiny(name)]
# Known excess over the minimum on {data 2, expert 4} (docs/PERFORMANCE.md), measured as a
# collective ratio; strict, so a fix shows up as an unexpected pass.
KNOWN_EXCESS = {
  # The static dropless exchange is sized for every (token, expert) slot of the ReLU router
  # (N = S * E pairs per group) times exchange_factor 2: its slack (12.6 MiB over the 12.6 MiB
  # exchange) is a third of the step's traffic. A ragged all-to-all would remove it; at factor
  # 1.0 the step is at the minimum ('remoe-tight-bound').
  "remoe": "ratio 1.36: the dropless exchange bound's slack on an S * E-pair exchange",
  # Families that compute their own output with the expert bank sharded on 'expert': GSPMD
  # gathers and all-reduces bank-sized buffers instead of moving the tokens (expert_reach).
  "smear": "ratio 2.78: GSPMD moves the merged experts' weights, not the tokens",
  "peer": "ratio 9.4, replicated work 1.26: the pool's dense gradient is all-reduced and "
  "collective-permuted (GSPMD), not computed where the neurons live",
  # Measured on the scanned models' unscanned twins at an exchange bound of 1.0; cause not found.
  "mixtral_8x7b": "replicated work 1.46 (bound 1.1): cause not yet found",
  "qwen3_moe_30b_a3b": "replicated work 1.12 (bound 1.1): cause not yet found",
}
# Known excess of dropless with tensor parallelism: the blocked dropless matmul runs as a loop
# over row blocks and XLA places the tensor-parallel all-reduce of the expert output inside it,
# once per block (12 per step, 34.1 MB) instead of once on the whole output (28.4 MB).
TP_DROPLESS_EXCESS = (
  "collective ratio 1.44 on {data 2, expert 2, tensor 2}: the tensor-parallel all-reduce runs "
  "once per dropless row block (12 per step) instead of once per layer"
)
CASES = [
  pytest.param(
    name,
    "dp2_ep4",
    None,
    _recipe_overrides(name),
    id=f"{name}-dp2_ep4",
    marks=[pytest.mark.xfail(strict=True, reason=KNOWN_EXCESS[name])]
    if name in KNOWN_EXCESS
    else [],
  )
  for name in MOE_RECIPES
] + [
  pytest.param(
    "switch_base",
    mesh,
    dispatch,
    {},
    id=f"switch_base-{mesh}-{dispatch}",
    # docs/PERFORMANCE.md has the measurement; a fix shows up as an unexpected pass.
    marks=[pytest.mark.xfail(strict=True, reason=TP_DROPLESS_EXCESS)]
    if (mesh, dispatch) == ("dp2_ep2_tp2", "dropless")
    else [],
  )
  for mesh in MESHES
  for dispatch in ("capacity", "all_to_all", "dropless")
  if not (mesh == "dp2_ep4" and dispatch == "capacity")
]
# Expert-parallel dropless computes exchange_factor x the balanced rows (the static bound's idle
# slots: 1.11 x the single-device FLOPs at the default 2.0 on this model); with a bound of 1.0
# any excess would be replicated work.
CASES.append(
  pytest.param(
    "switch_base", "dp2_ep4", "dropless", {"exchange_factor": 1.0}, id="dropless-tight-bound"
  )
)
CASES.append(
  pytest.param("remoe", "dp2_ep4", None, {"exchange_factor": 1.0}, id="remoe-tight-bound")
)


@pytest.mark.parametrize("name, mesh, dispatch, moe_overrides", CASES)
def test_collectives_are_near_the_minimum(name, mesh, dispatch, moe_overrides):
  cfg = tiny(name, MESHES[mesh], dispatch)
  cfg.model.moe.update(moe_overrides)
  single = mesh in ("dp2_ep4", "dp2_ep2_tp2")
  result = collectives.measure(cfg, jax.devices()[:8], single_device=single)
  measured, terms = result["collective_bytes"], result["minimum_terms"]
  assert result["remat_warnings"] == 0, result
  assert measured["all-to-all"] > 0  # the exchange happens
  if MESHES[mesh].get("fsdp", 1) > 1:
    assert result["collective_ratio_reduce_scatter"] <= 1.3, (measured, terms)
    assert result["collective_ratio"] <= 1.4, (measured, terms)
    assert measured["all-gather"] <= 1.01 * terms["fsdp_gather"], (measured, terms)
  else:
    assert result["collective_ratio"] <= 1.3, (measured, terms)
  if single:
    # The recipe's own dispatch counts (thor, top_p and remoe are dropless recipes). ReMoE's
    # exchange carries all S * E pair slots, so expert rows dominate the step and the CPU
    # blocked grouped matmul's padding of each local expert to whole blocks shows even at a
    # tight bound (2048 rows in 18 blocks of 128 per device vs 16384 in 136 on one; measured
    # replicated work 1.113).
    relu = cfg.model.moe.router == "relu"
    slack = cfg.model.moe.dispatch == "dropless" and (not moe_overrides or relu)
    assert result["replicated_work"] <= (1.15 if slack else 1.1), result


def test_sliced_all_reduces_are_told_apart():
  """The gradient of a weight sharded over 4 devices (batch sharded the same way) compiles on
  CPU to an all-reduce sliced to the shard; a replicated weight's to a plain all-reduce."""
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.ones((8, 16)), jax.NamedSharding(mesh, jax.P("x")))
  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  for spec, sliced in ((jax.P("x"), True), (jax.P(), False)):
    w = jax.device_put(jnp.ones((16, 32)), jax.NamedSharding(mesh, spec))
    text = jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile().as_text()
    all_reduce = hlo_collectives.bytes_by_kind(text, 4)["all-reduce"]
    assert all_reduce == 2 * 16 * 32 * 4 * 3 / 4
    assert hlo_collectives.sliced_all_reduce_bytes(text, 4) == (all_reduce if sliced else 0)


def test_collectives_in_a_loop_count_once_per_iteration():
  """A scanned model's layer collectives sit in a while body that the HLO text holds once:
  they count times the trip count, as the same loop unrolled does (the all-reduce of a sum
  over the sharded axis, 3 iterations)."""
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.ones((8, 16)), jax.NamedSharding(mesh, jax.P("x")))
  body = lambda c, _: (jnp.tanh(c + jnp.sum(c, 0)), None)
  scanned = lambda x: jax.lax.scan(body, x, length=3)[0]
  unrolled = lambda x: functools.reduce(lambda c, _: body(c, None)[0], range(3), x)
  texts = [jax.jit(f).lower(x).compile().as_text() for f in (scanned, unrolled)]
  assert " while(" in texts[0] and " while(" not in texts[1]
  got, want = (hlo_collectives.bytes_by_kind(t, 4)["all-reduce"] for t in texts)
  assert got == want == 3 * 2 * 16 * 4 * 3 / 4


@pytest.mark.parametrize(
  "name, dispatch", [("mixtral_8x7b", "dropless"), ("switch_base", "all_to_all")]
)
def test_bfloat16_compute_keeps_expert_gradients_in_the_parameter_dtype(name, dispatch):
  """bfloat16 compute, float32 parameters, {data 2, expert 4}: the expert weights' gradients
  are summed over `data` in float32 (the weights are cast inside the exchange's shard_map)."""
  cfg = tiny(name, {"data": 2, "expert": 4}, dispatch)
  cfg.model.dtype = "bfloat16"
  text = training.program_for(cfg, jax.devices()[:8]).lower().compile().as_text()
  m, moe = cfg.model, cfg.model.moe
  local = f"{moe.num_experts // 4},{m.d_model},{moe.d_expert or m.d_ff}"
  reduced = [line for line in text.splitlines() if " all-reduce(" in line and local in line]
  assert reduced and all(f"f32[{local}]" in line for line in reduced), reduced[:2]


def test_expert_weight_gradients_stay_in_their_shard():
  """On {expert: 8} every expert is on one device: no collective carries an expert weight
  (or its gradient); the other parameters' gradients are all-reduced over all 8."""
  cfg = tiny("switch_base", MESHES["ep8"])
  text = training.program_for(cfg, jax.devices()[:8]).lower().compile().as_text()
  m, moe = cfg.model, cfg.model.moe
  local = (moe.num_experts // 8, m.d_model, moe.d_expert or m.d_ff)
  shapes = {f"f32[{local[0]},{local[1]},{local[2]}]", f"f32[{local[0]},{local[2]},{local[1]}]"}
  for line in text.splitlines():
    if any(f" {kind}(" in line or f" {kind}-start(" in line for kind in hlo_collectives.KINDS):
      assert not any(s in line.split(" = ")[1].split(")")[0] for s in shapes), line[:200]
  assert hlo_collectives.bytes_by_kind(text, 8)["all-reduce"] > 0


def make_routing(expert_gn, rng, tokens_per_group: int) -> SparseRouting:
  """Pairs in choice-rank-major order (pair r * S + s = token s's (r+1)-th choice)."""
  g, n = expert_gn.shape
  return SparseRouting(
    token_index=jnp.tile(jnp.arange(tokens_per_group, dtype=jnp.int32), (g, n // tokens_per_group)),
    expert_index=jnp.asarray(expert_gn, jnp.int32),
    combine_weight=jnp.asarray(rng.uniform(0.1, 1.0, (g, n)), jnp.float32),
    valid=jnp.asarray(rng.random((g, n)) < 0.9),
  )


def reference_dropless_ep(x, routing, bank, *, num_devices, expert_shards, exchange_factor):
  """Each device sends at most ceil(factor * M / X) pairs per destination shard, by token (its
  groups in order, then the tokens of a group, then pair order); a sent pair adds
  weight * expert(x) to its token. Returns (y, dropped)."""
  x = np.asarray(x, np.float64)
  w_in, w_out = (np.asarray(bank.w_in[...], np.float64), np.asarray(bank.w_out[...], np.float64))
  token, expert = np.asarray(routing.token_index), np.asarray(routing.expert_index)
  weight, valid = np.asarray(routing.combine_weight, np.float64), np.asarray(routing.valid)
  groups, pairs = token.shape
  per_device = groups // num_devices
  per_shard = w_in.shape[0] // expert_shards
  gelu = lambda v: np.asarray(jax.nn.gelu(jnp.asarray(v, jnp.float32)), np.float64)
  y, dropped = np.zeros_like(x), 0
  for device in range(num_devices):
    bound = int(np.ceil(exchange_factor * per_device * pairs / expert_shards))
    sent = np.zeros(expert_shards, int)
    own = [
      (g, n) for g in range(device * per_device, (device + 1) * per_device) for n in range(pairs)
    ]
    for g, n in sorted(own, key=lambda gn: (gn[0], token[gn], gn[1])):
      if not valid[g, n]:
        continue
      dest = expert[g, n] // per_shard
      if sent[dest] >= bound:
        dropped += 1
        continue
      sent[dest] += 1
      e, t = expert[g, n], token[g, n]
      y[g, t] += weight[g, n] * (gelu(x[g, t] @ w_in[e]) @ w_out[e])
  return y, dropped / valid.sum()


@pytest.fixture(scope="module")
def mesh_dp2_ep4():
  return jax.make_mesh((2, 1, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def test_expert_parallel_dropless_counts_the_overflow(mesh_dp2_ep4):
  """16 groups of 16 tokens (2 per device), top-2 where most pairs want experts 0-1 (shard 0):
  with a bound of 1.0 x the balanced share, shard 0 overflows. The dropped fraction and the
  output equal a reference that simulates each device's send plan pair by pair. Without a factor
  (evaluation) the bound is the device's whole pool: nothing drops (the reference at X = 4)."""
  g, s, d, e, k = 16, 16, 8, 8, 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
  skewed = rng.random((g, s * k)) < 0.7
  expert = np.where(skewed, rng.integers(0, 2, (g, s * k)), rng.integers(0, e, (g, s * k)))
  routing = make_routing(expert, rng, s)
  bank = ExpertBank(e, d, 6, activation="gelu", init_std=0.5, out_std=0.5, rngs=nnx.Rngs(1))
  for factor, reference_factor in ((1.0, 1.0), (None, 4.0)):
    fn = jax.jit(
      functools.partial(
        dropless_dispatch.dropless_moe,
        num_experts=e,
        rules=sharding.DEFAULT,
        exchange_factor=factor,
      )
    )
    with jax.set_mesh(mesh_dp2_ep4):
      y, stats = fn(x, routing, bank)
    want_y, want_dropped = reference_dropless_ep(
      x, routing, bank, num_devices=8, expert_shards=4, exchange_factor=reference_factor
    )
    if factor is None:
      assert want_dropped == 0.0
    else:
      assert want_dropped > 0.05  # the case overflows
    np.testing.assert_allclose(float(stats["dropped_fraction"]), want_dropped, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), want_y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skew, factor", [(0.7, 1.0), (0.4, 2.0), (0.5, 1.5)])
def test_expert_parallel_dropless_drops_depend_only_on_earlier_tokens(mesh_dp2_ep4, skew, factor):
  """Training drops are causal: top-2 pairs that want shard 0 with probability `skew` overflow
  its bound (`factor` x the balanced share) somewhere in the device's pool; each device's 2
  groups are one 32-token stretch of a sequence (group_size < seq_len). The experts of every
  token after stream position t are drawn again: each token up to t gets exactly the same
  output (its pairs win or lose their send slots against earlier tokens' pairs only), while
  the later tokens' outputs change."""
  g, s, d, e, k, t = 16, 16, 8, 8, 2, 20
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
  draw = lambda: np.where(
    rng.random((g, s * k)) < skew, rng.integers(0, 2, (g, s * k)), rng.integers(0, e, (g, s * k))
  )
  expert = draw()
  routing = make_routing(expert, rng, s)
  position_gs = (np.arange(g) % 2)[:, None] * s + np.arange(s)  # place in the device's stretch
  later_gn = np.take_along_axis(position_gs, np.asarray(routing.token_index), axis=1) > t
  redrawn = jnp.asarray(np.where(later_gn, draw(), expert), jnp.int32)
  other = dataclasses.replace(routing, expert_index=redrawn)
  bank = ExpertBank(e, d, 6, activation="gelu", init_std=0.5, out_std=0.5, rngs=nnx.Rngs(1))
  fn = jax.jit(
    functools.partial(
      dropless_dispatch.dropless_moe, num_experts=e, rules=sharding.DEFAULT, exchange_factor=factor
    )
  )
  with jax.set_mesh(mesh_dp2_ep4):
    (y_a, stats_a), (y_b, stats_b) = fn(x, routing, bank), fn(x, other, bank)
  assert float(stats_a["dropped_fraction"]) > 0 and float(stats_b["dropped_fraction"]) > 0
  early = position_gs <= t
  y_a, y_b = np.asarray(y_a), np.asarray(y_b)
  np.testing.assert_array_equal(y_a[early], y_b[early])
  assert np.abs(y_a[~early] - y_b[~early]).max() > 1e-2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
  "dispatch, layout",
  [("capacity", "position"), ("dropless", "sequence"), ("all_to_all", "position")],
)
def test_one_vs_eight_devices_same_losses(corpus, tmp_path, dispatch, layout):
  def config(**mesh):
    cfg = tiny_config(corpus, **mesh)
    moe = cfg.model.moe
    moe.dispatch, moe.group_layout, moe.top_k = dispatch, layout, 2
    moe.group_size = 8 if layout == "position" else 32  # 8 groups per step either way
    moe.capacity_factor = moe.eval_capacity_factor = 4.0  # nothing dropped: equal functions
    moe.exchange_factor = 4.0  # = the expert shards: a destination can take all of a device's pairs
    cfg.train.steps = cfg.train.eval_every = cfg.train.checkpoint_every = 3
    return cfg

  one = train.run(config(data=1), str(tmp_path / "one"), devices=jax.devices()[:1], progress=False)
  eight = train.run(config(data=2, expert=4), str(tmp_path / "eight"), progress=False)
  a = np.array([one["losses"][s] for s in (1, 2, 3)])
  b = np.array([eight["losses"][s] for s in (1, 2, 3)])
  np.testing.assert_allclose(a, b, atol=1e-4)
