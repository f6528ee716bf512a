"""Scanned layers and remat policies compute the per-layer model's function (model/blocks.py)."""

import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, sharding
from moejax import mesh as mesh_lib
from moejax.model.transformer import Transformer
from moejax.ops import remat
from tests.helpers import mesh_step_losses, step_losses, tiny_config

STEPS = 20


def _config(router="switch", layers=4, moe_every=2, **model):
  """A very small model (d_model 32, 4 experts) on batches of 4 x 16 tokens."""
  c = tiny_config("unused")
  m, moe, t = c.model, c.model.moe, c.train
  m.num_layers, m.d_model, m.num_heads, m.d_ff, m.vocab_size, m.moe_every = (
    layers,
    32,
    4,
    64,
    128,
    moe_every,
  )
  moe.router, moe.num_experts, moe.group_size = router, 4, 16
  if router == "deepseek":  # top-2 with capacity: the position layout keeps it causal
    moe.top_k, moe.group_layout, moe.group_size = 2, "position", 4
    moe.deepseek.bias_update_rate = 0.05  # visible bias movement within 20 steps
  t.batch_size, t.seq_len, t.steps = 4, 16, STEPS
  c.optim.warmup_steps = 2
  for key, value in model.items():
    m[key] = value
  return c


@pytest.fixture(scope="module")
def reference():
  return step_losses(_config(), STEPS)


@pytest.mark.parametrize("policy", list(remat.POLICIES))
def test_scan_and_every_remat_policy_give_the_same_losses(reference, policy):
  got = step_losses(_config(scan_layers=True, remat=policy), STEPS)
  np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
  assert reference[-1] < reference[0] - 0.1  # it trains: the comparison is not of constants


@pytest.mark.parametrize("policy", ["full", "minimal", "save_dot_except_mlp"])
def test_remat_without_scan_gives_the_same_losses(reference, policy):
  np.testing.assert_allclose(
    step_losses(_config(remat=policy), STEPS), reference, atol=1e-5, rtol=0
  )


def test_router_state_carries_through_scan_and_remat():
  """DeepSeek's balance bias (non-parameter state updated in the forward pass) moves the same
  way scanned or not, with remat, over 20 steps; so do the losses that depend on it.

  Remat alone is bit-exact here; the scanned program (a while loop, fused differently by XLA)
  differs by 1 ulp from step 4 on, which top-2 routing with a moving bias amplifies to 1.0e-5 by
  step 20 (measured): the first 10 steps are held to 1e-5, all 20 to 2e-5.
  """
  plain = step_losses(_config("deepseek"), STEPS)
  scanned = step_losses(_config("deepseek", scan_layers=True, remat="full"), STEPS)
  np.testing.assert_allclose(scanned[:10], plain[:10], atol=1e-5, rtol=0)
  np.testing.assert_allclose(scanned, plain, atol=2e-5, rtol=0)
  assert plain[-1] < plain[0] - 0.1


def test_dense_model_scans_in_units_of_one_layer():
  plain = step_losses(_config(moe_every=0, layers=3), 5)
  scanned = step_losses(_config(moe_every=0, layers=3, scan_layers=True, remat="minimal"), 5)
  np.testing.assert_allclose(scanned, plain, atol=1e-5, rtol=0)


def test_stacked_parameters_metrics_and_sharding():
  c = _config(scan_layers=True)
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  per_layer = Transformer(_config().model, rngs=nnx.Rngs(0))
  # Unit [dense, MoE]: stack.0 holds layers 0 and 2, stack.1 layers 1 and 3, same values.
  np.testing.assert_array_equal(
    model.stack[1].ffn.experts.w_in[...][1], per_layer.blocks[3].ffn.experts.w_in[...]
  )
  np.testing.assert_array_equal(
    model.stack[0].attention.wq[...][0], per_layer.blocks[0].attention.wq[...]
  )
  assert model.stack[1].ffn.experts.w_in.get_metadata("axes")[0] == "layers"
  tokens = np.zeros((4, 16), np.int32)
  _, aux = model(tokens, train=False)
  _, want = per_layer(tokens, train=False)
  assert sorted(aux["metrics"]) == sorted(want["metrics"])
  assert "layer_3/dropped_fraction" in aux["metrics"]
  # The layer axis is replicated; the other axes follow the parameter's rules.
  c.mesh.data, c.mesh.expert, c.train.batch_size = 2, 4, 8
  shape = config_lib.validate(c, 8)
  rules = config_lib.rules_from_config(c.mesh)
  abstract = nnx.eval_shape(lambda: Transformer(c.model, rngs=nnx.Rngs(0), rules=rules))
  specs = sharding.state_shardings(nnx.state(abstract), mesh_lib.make_mesh(shape), rules)
  spec = nnx.to_pure_dict(specs)["stack"][1]["ffn"]["experts"]["w_in"].spec
  assert tuple(spec)[:2] == (None, "expert")


def test_scan_refuses_a_depth_that_is_not_whole_units():
  c = _config(layers=5, scan_layers=True)
  with pytest.raises(config_lib.ConfigError, match=r"num_layers=5 is not a multiple of 2"):
    config_lib.validate(c, 1)


def test_scan_on_a_mesh_equals_one_device():
  """8 devices ({data 2, expert 4}) with the scanned, rematerialised model: same losses."""
  c = _config(scan_layers=True, remat="full")
  c.mesh.data, c.mesh.expert, c.train.batch_size = 2, 4, 8  # one row per device
  want = _config()
  want.train.batch_size = 8
  np.testing.assert_allclose(mesh_step_losses(c, 3), step_losses(want, 3), atol=1e-5, rtol=0)
