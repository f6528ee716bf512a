"""Sparse upcycling: the plan, the error naming every mismatch, logits equal to the dense
model's right after upcycling, and training that continues from there.

A dense tiny run (configs/dense.py's shape: moe_every 0) is trained once for the module.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import restore, train, upcycle
from tests.helpers import tiny_config, write_corpus


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
  cfg = tiny_config(corpus)
  cfg.model.moe_every = 0  # dense: every layer's feed-forward is a DenseMLP of width d_ff
  cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 24, 24, 24
  cfg.optim.learning_rate = 3e-3
  workdir = str(tmp_path_factory.mktemp("dense"))
  summary = train.run(cfg, workdir, progress=False)
  return workdir, corpus, summary


def _moe_config(corpus, dense_dir):
  cfg = tiny_config(corpus, data=2, expert=4)
  moe = cfg.model.moe
  moe.router, moe.top_k = "switch", 1
  moe.switch.normalize_weights = True  # combine weight p / p = 1
  moe.switch.jitter_eps = 0.0  # no router noise
  moe.eval_capacity_factor = float(moe.num_experts)  # C = S: nothing dropped
  cfg.init.from_dense = dense_dir
  return cfg


def _logits(graphdef, params, rest, tokens, mesh):
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t, train=False))
    logits, aux = fn(params, rest, tokens)
  return np.asarray(logits), jax.device_get(aux["metrics"])


def test_upcycled_moe_computes_the_dense_function_then_trains(dense, tmp_path):
  dense_dir, corpus, dense_summary = dense
  cfg = _moe_config(corpus, dense_dir)
  workdir = str(tmp_path / "moe")
  start = train.run(cfg, workdir, progress=False, stop_at=0)  # upcycle only, no step
  mesh, rules = start["mesh"], restore.config_lib.rules_from_config(cfg.mesh)
  tokens = np.random.default_rng(0).integers(0, 512, (8, 32), dtype=np.int32)

  dense_cfg = restore.load_run_config(dense_dir)
  dense_cfg.mesh.data, dense_cfg.mesh.expert = 2, 4
  dense_model = restore.restore_model(dense_dir, dense_cfg, mesh, rules)
  want, _ = _logits(dense_model.graphdef, dense_model.params, dense_model.model_state, tokens, mesh)
  graphdef, _, _ = restore.abstract_model(cfg.model, rules=rules)
  state = start["state"]
  got, metrics = _logits(graphdef, state["params"], state["model_state"], tokens, mesh)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Not vacuous: tokens really went to several experts (all copies of the dense MLP), none
  # was dropped, and the router is fresh (not any dense weight).
  load = np.asarray(metrics["layer_1/expert_load"])
  assert (load > 0).sum() >= 2, load
  assert float(metrics["layer_1/dropped_fraction"]) == 0.0
  experts = np.asarray(state["params"]["blocks"][1]["ffn"]["experts"]["w_in"])
  dense_w_in = np.asarray(dense_model.params["blocks"][1]["ffn"]["w_in"])
  for e in range(experts.shape[0]):
    np.testing.assert_array_equal(experts[e], dense_w_in)
  assert int(state["step"]) == 0

  # A short training continues from the upcycled model: its first loss is the dense model's
  # level, far below a fresh model's ln(512) = 6.24.
  cfg.train.steps = 4
  summary = train.run(cfg, workdir, progress=False)
  losses = [summary["losses"][s] for s in range(1, 5)]
  assert all(np.isfinite(losses))
  dense_last = dense_summary["eval"]["eval_loss"]
  assert losses[0] < dense_last + 0.3 < np.log(512) - 0.5, (losses, dense_last)


def test_plan_copies_broadcasts_and_keeps_router_fresh():
  dense = {
    "embed": (16, 8),
    "blocks.0.ffn.w_in": (8, 32),
    "blocks.0.ffn.w_out": (32, 8),
    "blocks.1.ffn.w_in": (8, 32),
    "blocks.1.ffn.w_out": (32, 8),
  }
  moe = {
    "embed": (16, 8),
    "blocks.0.ffn.w_in": (8, 32),
    "blocks.0.ffn.w_out": (32, 8),
    "blocks.1.ffn.experts.w_in": (4, 8, 32),
    "blocks.1.ffn.experts.w_out": (4, 32, 8),
    "blocks.1.ffn.router.kernel": (8, 4),
  }
  plan = upcycle.plan_upcycling(moe, dense)
  assert plan == {
    "embed": ("copy", "embed"),
    "blocks.0.ffn.w_in": ("copy", "blocks.0.ffn.w_in"),
    "blocks.0.ffn.w_out": ("copy", "blocks.0.ffn.w_out"),
    "blocks.1.ffn.experts.w_in": ("experts", "blocks.1.ffn.w_in"),
    "blocks.1.ffn.experts.w_out": ("experts", "blocks.1.ffn.w_out"),
    "blocks.1.ffn.router.kernel": ("fresh", None),
  }


def test_mismatch_error_names_every_parameter_before_any_data(dense, tmp_path):
  dense_dir, corpus, _ = dense
  cfg = _moe_config(corpus, dense_dir)
  cfg.model.d_ff, cfg.model.vocab_size = 96, 1024
  workdir = tmp_path / "bad"
  with pytest.raises(upcycle.UpcycleError) as err:
    train.run(cfg, str(workdir), progress=False)
  message = str(err.value)
  for name in (
    "blocks.0.ffn.w_in",
    "blocks.0.ffn.w_out",
    "blocks.1.ffn.experts.w_in",
    "blocks.1.ffn.experts.w_out",
    "embed",
    "unembed",
  ):
    assert f"{name}:" in message or f"{name} [" in message, name
  assert "6 parameter(s) do not match" in message
  assert "[64, 96]" in message and "[64, 128]" in message
  # Raised before the data pipeline or the tokenizer touched the new workdir.
  assert os.listdir(workdir) == []  # not even config.json: nothing was written


def test_expert_noise_is_relative_and_per_expert():
  dense_w = np.arange(12, dtype=np.float32).reshape(3, 4)  # std 3.45
  fresh = {"experts": {"w_in": np.zeros((5, 3, 4), np.float32)}, "router": np.ones((3, 5))}
  plan = {"experts.w_in": ("experts", "w"), "router": ("fresh", None)}
  out = upcycle.upcycle_params(fresh, {"w": dense_w}, plan, noise=0.01, key=jax.random.key(0))
  copies = np.asarray(out["experts"]["w_in"])
  np.testing.assert_array_equal(np.asarray(out["router"]), fresh["router"])  # fresh kept
  deviation = copies - dense_w[None]
  assert 0 < np.abs(deviation).max() < 0.01 * dense_w.std() * 6  # small, relative to std(w)
  assert not np.allclose(copies[0], copies[1])  # experts differ, so they can specialise
  exact = upcycle.upcycle_params(fresh, {"w": dense_w}, plan, noise=0.0, key=jax.random.key(0))
  np.testing.assert_array_equal(
    np.asarray(exact["experts"]["w_in"]), np.broadcast_to(dense_w, (5, 3, 4))
  )


def test_upcycling_into_a_scanned_model(dense, tmp_path):
  """The plan works on per-layer names: a per-layer dense checkpoint upcycles into a scanned
  MoE model (stacked experts) that computes the dense function."""
  dense_dir, corpus, _ = dense
  cfg = _moe_config(corpus, dense_dir)
  cfg.model.scan_layers = True
  start = train.run(cfg, str(tmp_path / "moe"), progress=False, stop_at=0)
  mesh, rules = start["mesh"], restore.config_lib.rules_from_config(cfg.mesh)
  dense_cfg = restore.load_run_config(dense_dir)
  dense_cfg.mesh.data, dense_cfg.mesh.expert = 2, 4
  dense_model = restore.restore_model(dense_dir, dense_cfg, mesh, rules)
  tokens = np.random.default_rng(0).integers(0, 512, (8, 32), dtype=np.int32)
  want, _ = _logits(dense_model.graphdef, dense_model.params, dense_model.model_state, tokens, mesh)
  graphdef, _, _ = restore.abstract_model(cfg.model, rules=rules)
  state = start["state"]
  got, _ = _logits(graphdef, state["params"], state["model_state"], tokens, mesh)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  experts = np.asarray(state["params"]["stack"][1]["ffn"]["experts"]["w_in"])  # [units, E, D, F]
  np.testing.assert_array_equal(experts[0, 3], dense_model.params["blocks"][1]["ffn"]["w_in"])
