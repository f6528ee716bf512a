"""Every dispatch computes the same MoE layer: outputs and gradients, 1 device and 8 devices.

With enough capacity nothing is dropped, so `capacity`, `dropless` (both grouped matmuls) and
`all_to_all` must agree (float32, 1e-5) in outputs and in gradients w.r.t. the tokens, the
expert weights and the router weights. With little capacity, `capacity` and `all_to_all` must
drop exactly the pairs a python loop over pairs says, and `dropless` must drop none.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from moejax import config_lib, sharding
from moejax.model import routers
from moejax.model.experts import ExpertBank
from moejax.model.routers import expert_choice, top_k
from moejax.model.transformer import Transformer
from moejax.ops import all_to_all, capacity, dropless, dropless_dispatch
from tests.helpers import tiny_config

G, S, D, F, E = 8, 16, 16, 32, 8  # groups, tokens per group, d_model, expert hidden, experts

DISPATCHES = {
  "capacity": capacity.capacity_moe,
  "dropless_blocked": functools.partial(dropless_dispatch.dropless_moe, grouped_matmul="blocked"),
  "dropless_ragged_dot": functools.partial(
    dropless_dispatch.dropless_moe, grouped_matmul="ragged_dot"
  ),
  "all_to_all": all_to_all.all_to_all_moe,
}
# router name -> (route one group's logits [S, E], capacity that drops nothing)
ROUTERS = {
  "top1": (functools.partial(top_k.route_top_k, top_k=1), S),
  "top2": (functools.partial(top_k.route_top_k, top_k=2), 2 * S),
  # Expert choice: each expert takes c = 4 tokens, so capacity c keeps every pair.
  "expert_choice": (functools.partial(expert_choice.route_expert_choice, capacity=4), 4),
}


def make_inputs(activation="gelu"):
  bank = ExpertBank(E, D, F, activation=activation, init_std=0.3, out_std=0.3, rngs=nnx.Rngs(0))
  graphdef, bank_state = nnx.split(bank)
  rng = np.random.default_rng(0)
  x_gsd = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
  w_router_de = jnp.asarray(rng.normal(size=(D, E)), jnp.float32)
  return graphdef, bank_state, x_gsd, w_router_de


def moe_loss_fn(dispatch_fn, route_fn, graphdef, cap, rules):
  """(x, router weights, expert state) -> (sum of a fixed projection of y, (y, stats))."""
  probe_d = jnp.linspace(-1.0, 1.0, D)

  def loss(x_gsd, w_router_de, bank_state):
    bank = nnx.merge(graphdef, bank_state)
    routing = jax.vmap(route_fn)(jnp.einsum("gsd,de->gse", x_gsd, w_router_de))
    y_gsd, stats = dispatch_fn(x_gsd, routing, bank, num_experts=E, capacity=cap, rules=rules)
    return jnp.sum(jnp.tanh(y_gsd) * probe_d), (y_gsd, stats)

  return loss


def mesh_8():
  return jax.make_mesh((2, 1, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def run_all(route_fn, cap, mesh, activation="gelu"):
  graphdef, bank_state, x_gsd, w_router_de = make_inputs(activation)
  results = {}
  # Without a mesh all_to_all is the capacity code (covered by the dropping test below); on the
  # mesh dropless runs per device with either grouped matmul, so one of them suffices there.
  skip = "dropless_ragged_dot" if mesh is not None else "all_to_all"
  for name, dispatch_fn in DISPATCHES.items():
    if name == skip:
      continue
    rules = None if mesh is None else sharding.DEFAULT
    loss = moe_loss_fn(dispatch_fn, route_fn, graphdef, cap, rules)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    if mesh is None:
      results[name] = fn(x_gsd, w_router_de, bank_state)
    else:
      with jax.set_mesh(mesh):
        results[name] = fn(x_gsd, w_router_de, bank_state)
  return results


@pytest.mark.parametrize("on_mesh", [False, True], ids=["1dev", "mesh_data2_expert4"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_dispatches_agree_without_drops(router, on_mesh):
  route_fn, cap = ROUTERS[router]
  # swiglu on one case covers the gate branch of every grouped matmul.
  activation = "swiglu" if router == "top2" else "gelu"
  results = run_all(route_fn, cap, mesh_8() if on_mesh else None, activation)
  (_, (y_ref, stats_ref)), grads_ref = results["capacity"]
  assert float(stats_ref["dropped_fraction"]) == 0.0
  assert float(jnp.abs(y_ref).mean()) > 1e-3  # the layer is not trivially zero
  for name, ((_, (y, stats)), grads) in results.items():
    assert float(stats["dropped_fraction"]) == 0.0, name
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=name)
    for path, g, g_ref in zip(("x", "router", "experts"), grads, grads_ref, strict=True):
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert float(jnp.abs(b).max()) > 0, (name, path)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{name} d/d{path}")


def brute_force_kept(token_gn, expert_gn, valid_gn, cap):
  """Python loop: in pair order, a valid pair keeps a slot while its expert has < cap."""
  kept = np.zeros(token_gn.shape, bool)
  for g in range(token_gn.shape[0]):
    counts = [0] * E
    for n in range(token_gn.shape[1]):
      e = int(expert_gn[g, n])
      if valid_gn[g, n]:
        kept[g, n] = counts[e] < cap
        counts[e] += 1
  return kept


@pytest.mark.parametrize("on_mesh", [False, True], ids=["1dev", "mesh_data2_expert4"])
def test_capacity_drops_exactly_the_brute_force_pairs(on_mesh):
  cap = 2  # top-2 over 16 tokens and 8 experts: 32 pairs for 16 slots, many drops
  route_fn = functools.partial(top_k.route_top_k, top_k=2)
  graphdef, bank_state, x_gsd, w_router_de = make_inputs()
  bank = nnx.merge(graphdef, bank_state)
  routing = jax.vmap(route_fn)(jnp.einsum("gsd,de->gse", x_gsd, w_router_de))
  kept_gn = brute_force_kept(routing.token_index, routing.expert_index, routing.valid, cap)
  # Reference output: a python loop over the kept pairs, in numpy.
  x, w_in, w_out = (np.asarray(a, np.float64) for a in (x_gsd, bank.w_in[...], bank.w_out[...]))
  gelu = lambda h: np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
  expect_gsd = np.zeros((G, S, D))
  for g, n in zip(*np.nonzero(kept_gn), strict=True):
    s, e = int(routing.token_index[g, n]), int(routing.expert_index[g, n])
    expect_gsd[g, s] += float(routing.combine_weight[g, n]) * (gelu(x[g, s] @ w_in[e]) @ w_out[e])
  expect_dropped = 1.0 - kept_gn.sum() / routing.valid.sum()
  assert 0.2 < expect_dropped < 0.8  # the case really drops
  dropped_tokens = ~np.any(
    (routing.token_index[..., None] == np.arange(S)) & kept_gn[..., None], axis=1
  )
  assert dropped_tokens.any()
  mesh = mesh_8() if on_mesh else None
  for name in ("capacity", "all_to_all", "dropless_blocked"):
    rules = None if mesh is None else sharding.DEFAULT
    fn = jax.jit(functools.partial(DISPATCHES[name], num_experts=E, capacity=cap, rules=rules))
    if mesh is None:
      y, stats = fn(x_gsd, routing, bank)
    else:
      with jax.set_mesh(mesh):
        y, stats = fn(x_gsd, routing, bank)
    if name == "dropless_blocked":  # computes every pair: differs exactly where drops happened
      assert float(stats["dropped_fraction"]) == 0.0
      assert not np.allclose(y, expect_gsd, atol=1e-3)
      continue
    np.testing.assert_allclose(float(stats["dropped_fraction"]), expect_dropped, rtol=1e-6)
    np.testing.assert_allclose(y, expect_gsd, atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.all(np.asarray(y)[dropped_tokens] == 0.0), name


def test_blocked_layout_is_expert_contiguous_and_padded():
  # 7 valid pairs on 3 experts with blocks of 2: counts [3, 0, 4] -> padded [4, 0, 4].
  expert_m = jnp.array([2, 0, 2, 0, 1, 2, 0, 2], jnp.int32)
  valid_m = jnp.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
  row_m, expert_q, used_q = dropless.blocked_layout(expert_m, valid_m, num_experts=3, block=2)
  # Expert 0 pairs (m = 1, 3, 6) -> rows 0, 1, 2; expert 2 (m = 0, 2, 5, 7) -> rows 4..7;
  # the invalid pair -> R = (ceil(8 / 2) + 3) * 2 = 14, out of bounds.
  np.testing.assert_array_equal(row_m, [4, 0, 5, 1, 14, 6, 2, 7])
  np.testing.assert_array_equal(expert_q[:4], [0, 0, 2, 2])
  np.testing.assert_array_equal(used_q, [True] * 4 + [False] * 3)


def test_all_to_all_rejects_groups_that_do_not_split():
  graphdef, bank_state, x_gsd, w_router_de = make_inputs()
  routing = jax.vmap(functools.partial(top_k.route_top_k, top_k=1))(x_gsd[:4] @ w_router_de)
  with jax.set_mesh(mesh_8()):
    with pytest.raises(ValueError, match="4 routing groups"):
      all_to_all.all_to_all_moe(
        x_gsd[:4],
        routing,
        nnx.merge(graphdef, bank_state),
        num_experts=E,
        capacity=S,
        rules=sharding.DEFAULT,
      )


def test_config_validates_dispatch():
  c = config_lib.default_config()
  c.model.moe.dispatch = "ragged"
  with pytest.raises(config_lib.ConfigError, match="dispatch='ragged' is not one of: capacity"):
    config_lib.validate(c, 1)
  c.model.moe.dispatch = "all_to_all"
  c.mesh.expert = 4
  assert config_lib.validate(c, 8)["expert"] == 4  # 32 x 128 tokens / 256 = 16 groups, 8 devices
  c.model.moe.group_size = 1024  # 4 groups for 8 devices: padded to 8, with a warning
  with mock.patch.object(config_lib.logging, "warning") as warning:
    assert config_lib.validate(c, 8)["expert"] == 4
  assert "4 routing groups" in warning.call_args[0][0] % warning.call_args[0][1:]
  c.model.moe.group_size = 256
  c.mesh.rules.group = "expert,data,fsdp"  # the expert axes must be the minor part of `group`
  with pytest.raises(config_lib.ConfigError, match="the expert axes last"):
    config_lib.validate(c, 8)


@pytest.mark.parametrize("router", ["switch", "soft_moe"])
def test_groups_that_do_not_split_are_padded_on_the_mesh(router):
  """12 routing groups on 8 group shards: every dispatch pads to 16 groups and returns what one
  device computes (the padded groups hold no pair and are cut off)."""
  m = tiny_config("unused").model
  m.num_layers, m.d_model, m.d_ff, m.vocab_size = 2, 32, 64, 64
  m.moe.router, m.moe.group_size, m.moe.num_experts = router, 8, 8
  m.moe.eval_capacity_factor = float(m.moe.num_experts)  # nothing dropped
  tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, m.vocab_size)  # 96 tokens: 12 groups
  reference = None
  for dispatch in ("capacity", "dropless", "all_to_all") if router == "switch" else ("capacity",):
    m.moe.dispatch = dispatch
    for rules, mesh in ((None, None), (sharding.DEFAULT, mesh_8())):
      model = Transformer(m, rngs=nnx.Rngs(0), rules=rules)
      graphdef, state = nnx.split(model)
      forward = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t, train=False)[0])
      if mesh is None:
        logits = forward(state, tokens)
      else:
        with jax.set_mesh(mesh):
          logits = forward(state, tokens)
      if reference is None:
        reference = np.asarray(logits)
      np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5, err_msg=dispatch)


# Families that go through a dispatch (SMEAR and PEER compute their own output).
SPARSE_ROUTERS = sorted(
  name for name, cls in routers.families().items() if name != "soft_moe" and not cls.COMPUTES_OUTPUT
)


@pytest.mark.parametrize("router", SPARSE_ROUTERS)
def test_every_sparse_router_runs_dropless_in_the_model(router):
  """Through the whole model (eval mode, a capacity that drops nothing), dropless == capacity."""
  cfg = tiny_config("unused")
  m = cfg.model
  m.num_layers, m.d_model, m.d_ff, m.vocab_size = 2, 32, 64, 64
  m.moe.router, m.moe.top_k, m.moe.group_size = router, 1 if router in ("base", "hash") else 2, 16
  if router == "autonomy":
    m.moe.d_expert = 32  # its W_up is [E, d_low, d_expert]
  m.moe.eval_capacity_factor = float(m.moe.num_experts)  # C = S * k: nothing dropped
  if router == "expert_choice":
    m.moe.eval_capacity_factor = 2.0  # expert choice: c = 2 S / E tokens per expert, all kept
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, m.vocab_size)
  logits = {}
  for dispatch in ("capacity", "dropless"):
    m.moe.dispatch = dispatch
    model = Transformer(m, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t, train=False))
    logits[dispatch], aux = forward(state, tokens)
    dropped = [v for k, v in aux["metrics"].items() if k.endswith("dropped_fraction")]
    assert dropped and all(float(v) == 0.0 for v in dropped), (dispatch, dropped)
  np.testing.assert_allclose(logits["dropless"], logits["capacity"], atol=1e-5, rtol=1e-5)
