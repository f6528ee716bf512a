"""Model FLOPs for MFU (benchmarks/mfu.py) against the model's own parameters and XLA's count."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import mfu
from benchmarks import train_step as bench
from moejax import optim, train_step
from moejax.model.transformer import Transformer


def _param_shapes(cfg):
  """{path string: shape} of every parameter of the model `cfg` describes (no allocation)."""
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  return {
    jax.tree_util.keystr(path): x.shape
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
  }


def _brute_force_active(cfg):
  """Matrices one token multiplies by, read off the parameter tree: every weight of rank >= 2
  except the embedding table (a gather); expert banks [E, ...] count k of their E experts."""
  total = 0
  num_experts, k = cfg.model.moe.num_experts, cfg.model.moe.top_k
  for path, shape in _param_shapes(cfg).items():
    if len(shape) < 2 or path == "['embed']":
      continue
    size = int(jnp.prod(jnp.array(shape)))
    total += size * k // num_experts if "['experts']" in path else size
  return total


@pytest.mark.parametrize(
  "spec", ["configs/dense.py:tiny", "configs/switch_base.py:tiny", "configs/gshard_top2.py:tiny"]
)
def test_active_params_match_the_parameter_tree(spec):
  cfg = bench.load_config(spec)
  assert mfu.active_matmul_params(cfg) == _brute_force_active(cfg)


def test_model_flops_match_xla_cost_analysis_of_the_dense_train_step():
  """For a dense model every FLOP XLA counts is a model FLOP but the elementwise ones, so XLA's
  count of the jitted train step is the formula's within a few percent (measured 1.013)."""
  cfg = bench.load_config("configs/dense.py:tiny")
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, 0)
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  step = jax.jit(train_step.make_train_step(graphdef, opt, {}, schedule))
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  batch = {"inputs": jnp.zeros(shape, jnp.int32), "targets": jnp.zeros(shape, jnp.int32)}
  cost = step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ratio = cost["flops"] / (mfu.model_flops_per_token(cfg) * shape[0] * shape[1])
  assert 1.0 <= ratio <= 1.06, ratio


def test_peak_lookup_prefers_the_specific_name_and_knows_no_cpu():
  assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert mfu.peak_flops("TPU v5 lite") == 197e12
  assert mfu.peak_flops("TPU v5p") == 459e12
  assert mfu.peak_flops("cpu") is None
  cfg = bench.load_config("configs/dense.py:tiny")
  assert mfu.mfu(cfg, 1000.0, "cpu") is None
  assert mfu.mfu(cfg, 1000.0, "cpu", peak_override=1e12) == pytest.approx(
    mfu.model_flops_per_token(cfg) * 1000.0 / 1e12
  )


def test_1b_preset_has_about_a_billion_parameters_and_16_experts_top2():
  cfg = bench.resize_1b(bench.load_config("configs/switch_base.py"))
  total = sum(int(jnp.prod(jnp.array(s))) for s in _param_shapes(cfg).values())
  assert 0.85e9 < total < 1.1e9, total
  assert (cfg.model.moe.num_experts, cfg.model.moe.top_k) == (16, 2)
  bench.dense_equivalent(cfg)  # equal active FLOPs baseline exists (top_k * d_expert == d_ff)
  assert mfu.active_matmul_params(cfg) == _brute_force_active(cfg)
