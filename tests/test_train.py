"""End to end: training on 1 and 8 devices, expert sharding, metrics, exact resume."""

import json

import jax
import numpy as np
import pytest

from moejax import metrics as metrics_lib
from moejax import train
from tests.helpers import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def _expert_w_in(state):
  return state["params"]["blocks"][1]["ffn"]["experts"]["w_in"]


def test_one_vs_eight_devices_same_losses(corpus, tmp_path):
  one = train.run(
    tiny_config(corpus, data=1),
    str(tmp_path / "one"),
    devices=jax.devices()[:1],
    progress=False,
    stop_at=5,
  )
  eight = train.run(
    tiny_config(corpus, data=2, expert=4), str(tmp_path / "eight"), progress=False, stop_at=5
  )
  a = np.array([one["losses"][s] for s in range(1, 6)])
  b = np.array([eight["losses"][s] for s in range(1, 6)])
  np.testing.assert_allclose(a, b, atol=1e-4)
  assert np.all(np.isfinite(a))

  # Expert weights are sharded on the 'expert' mesh axis, and per-device bytes shrink.
  w = _expert_w_in(eight["state"])
  assert w.sharding.spec[0] == "expert"
  assert w.addressable_shards[0].data.shape[0] == w.shape[0] // 4

  def per_device_bytes(state):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["params"]))

  total = sum(x.nbytes for x in jax.tree.leaves(eight["state"]["params"]))
  assert per_device_bytes(one["state"]) == total
  assert per_device_bytes(eight["state"]) < total


def test_resume_is_exact(corpus, tmp_path):
  cfg = tiny_config(corpus, data=2, expert=4)
  straight = train.run(cfg, str(tmp_path / "straight"), progress=False)
  first = train.run(cfg, str(tmp_path / "resumed"), progress=False, stop_at=4)
  assert max(first["losses"]) == 4
  second = train.run(cfg, str(tmp_path / "resumed"), progress=False)
  assert min(second["losses"]) == 5  # resumed after step 4
  for step in range(5, 9):
    assert second["losses"][step] == straight["losses"][step], step
  for a, b in zip(
    jax.tree.leaves(straight["state"]["params"]),
    jax.tree.leaves(second["state"]["params"]),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metrics_file_and_learning(corpus, tmp_path):
  cfg = tiny_config(corpus)
  cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = 30, 30, 5
  train.run(cfg, str(tmp_path / "run"), progress=False)
  lines = metrics_lib.read_metrics(str(tmp_path / "run"))
  train_lines = [line for line in lines if "loss" in line]
  assert [line["step"] for line in train_lines] == [5, 10, 15, 20, 25, 30]
  first = train_lines[0]
  for key in (
    "cross_entropy",
    "learning_rate",
    "tokens_per_second",
    "grad_norm",
    "layer_1/load_balance_loss",
    "layer_1/router_z_loss",
    "layer_1/dropped_fraction",
    "layer_1/router_entropy",
  ):
    assert key in first, key
  load = np.array(first["layer_1/expert_load"])
  assert load.shape == (4,) and load.sum() == pytest.approx(1.0, abs=1e-5)
  evals = [line for line in lines if "eval_loss" in line]
  assert evals and evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
  assert train_lines[-1]["cross_entropy"] < train_lines[0]["cross_entropy"]
  assert (tmp_path / "run" / "checkpoints").is_dir()
  assert any((tmp_path / "run" / "tensorboard").iterdir())
  json.dumps(lines)  # JSON-clean
