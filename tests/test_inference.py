"""Using a trained run: evaluate (any mesh, any step, other data), generate, plots, TensorBoard.

One tiny run (data 2 x expert 4, 8 steps, evaluated at steps 4 and 8) is trained once for the
module; every test reads it.
"""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import config_lib, evaluate, generate, plot, restore, train
from moejax import metrics as metrics_lib
from tests.helpers import tiny_config, write_corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
  workdir = str(tmp_path_factory.mktemp("run"))
  train.run(tiny_config(corpus, data=2, expert=4), workdir, progress=False)
  return workdir, corpus


def _logged_eval(workdir):
  return {x["step"]: x["eval_loss"] for x in metrics_lib.read_metrics(workdir) if "eval_loss" in x}


def test_evaluate_reproduces_logged_eval_loss_on_other_meshes(run, tmp_path):
  workdir, _ = run
  logged = _logged_eval(workdir)
  assert sorted(logged) == [4, 8]
  # One device (the run trained on 8), latest step.
  cfg = restore.load_run_config(workdir)
  mesh, rules = restore.make_inference_mesh(cfg, devices=jax.devices()[:1])
  batches = evaluate.load_batches(cfg, workdir, None, None)
  result = evaluate.evaluate(restore.restore_model(workdir, cfg, mesh, rules), batches)
  assert result["step"] == 8
  assert abs(result["loss"] - logged[8]) < 1e-4, (result["loss"], logged[8])
  layer = result["layers"]["layer_1"]
  assert np.sum(layer["expert_load"]) == pytest.approx(1.0, abs=1e-5)
  assert 0.0 <= layer["dropped_fraction"] <= 1.0
  assert 0.0 < layer["router_entropy"] <= np.log(4) + 1e-6
  assert "layer_0" not in result["layers"]  # dense layer: no router metrics

  # The CLI on an 8-device data-parallel mesh at the earlier step, JSON out.
  out = tmp_path / "eval.json"
  evaluate.main(["--workdir", workdir, "--step", "4", "--mesh", "data=8", "--json", str(out)])
  at4 = json.loads(out.read_text())
  assert at4["step"] == 4 and abs(at4["loss"] - logged[4]) < 1e-4, (at4["loss"], logged[4])
  assert at4["perplexity"] == pytest.approx(np.exp(at4["loss"]))


def test_evaluate_on_given_files(run, tmp_path):
  workdir, _ = run
  other = tmp_path / "other"
  other.mkdir()
  glob = write_corpus(other, num_files=1, words_per_file=3000, seed=7)
  result = evaluate.main(["--workdir", workdir, "--data", glob, "--batches", "2"])
  cfg = restore.load_run_config(workdir)
  assert result["tokens"] == 2 * cfg.train.batch_size * cfg.train.seq_len
  assert np.isfinite(result["loss"]) and result["data"] == glob


def test_evaluate_user_errors(run, tmp_path):
  workdir, _ = run
  with pytest.raises(config_lib.ConfigError, match=r"step 5 is not in .* saved steps: \[4, 8\]"):
    evaluate.main(["--workdir", workdir, "--step", "5"])
  proc = subprocess.run(
    [sys.executable, "-m", "moejax.evaluate", "--workdir", str(tmp_path / "nothing")],
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("moejax: error: no config.json in")


def test_generate_text_from_run(run):
  workdir, _ = run
  args = ["--workdir", workdir, "--prompt", "The king", "--max_new_tokens", "12", "--seed", "1"]
  greedy = generate.main([*args, "--temperature", "0", "--num_samples", "2"])
  assert len(greedy) == 2 and greedy[0] == greedy[1]  # greedy rows agree
  assert greedy[0].startswith("The king") and len(greedy[0]) > len("The king")
  sampled = generate.main([*args, "--top_k", "20", "--top_p", "0.9", "--num_samples", "3"])
  assert len(sampled) == 3 and len(set(sampled)) > 1  # different rows draw differently
  assert sampled == generate.main([*args, "--top_k", "20", "--top_p", "0.9", "--num_samples", "3"])


def _read_events(directory):
  """All Event protos of the TensorBoard files in `directory` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
      pos += 12 + length + 4
  return events


def test_tensorboard_has_per_layer_expert_load_histograms(run):
  workdir, _ = run
  logged = {
    x["step"]: x["layer_1/expert_load"]
    for x in metrics_lib.read_metrics(workdir)
    if "layer_1/expert_load" in x
  }
  seen = {}
  for event in _read_events(os.path.join(workdir, "tensorboard")):
    for value in event.summary.value:
      if value.tag == "layer_1/expert_load" and value.HasField("histo"):
        seen[event.step] = list(value.histo.bucket)
  assert sorted(seen) == sorted(logged) == list(range(1, 9))
  for step, load in logged.items():
    # Bucket i is expert i, its height the load of expert i.
    np.testing.assert_allclose(seen[step], load, rtol=1e-6)


def test_plots_from_runs(run, tmp_path):
  workdir, _ = run
  import matplotlib.image

  paths = plot.main(["--workdir", workdir, workdir, "--out", str(tmp_path)])
  names = sorted(os.path.basename(p) for p in paths)
  run_name = os.path.basename(workdir)
  expected = [
    "expert_load_" + run_name + ".png",
    f"expert_load_{run_name}_2.png",
    "loss.png",
    "routing.png",
  ]
  assert names == sorted(expected)
  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400, image.shape
    colours = np.unique(image.reshape(-1, image.shape[-1]).round(2), axis=0)
    assert len(colours) > 20 and image.std() > 0.05, path  # drawn, not blank
