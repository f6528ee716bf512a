"""Training and evaluating on prepared data through the real entry points.

- A run on a two-source mixture, SIGKILLed after a checkpoint and rerun, logs for every step the
  loss of an uninterrupted run (both through `python -m moejax.train`), and the per-source token
  counts the schedule gives.
- `moejax.evaluate` on the run reads the same held-out blocks (its loss is the run's eval_loss).
- Bad prepared data stops `train.run` before anything is compiled.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moejax import evaluate, train
from moejax import metrics as metrics_lib
from moejax.data import mixture, prepare, shard_format
from tests import prepared_corpus
from tests.helpers import tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]
STEPS, QUIET = 10, {"log": lambda *a: None}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
  """Two prepared sources sharing one sentencepiece tokenizer (vocab 512 = tiny_config's)."""
  tmp = tmp_path_factory.mktemp("prepared")
  (tmp / "t1").mkdir()
  (tmp / "t2").mkdir()
  prepare.prepare(write_corpus(tmp / "t1", seed=1), str(tmp / "one"), vocab_size=512, **QUIET)
  tokenizer = str(tmp / "one" / "tokenizer.model")
  second = write_corpus(tmp / "t2", num_files=2, seed=2)
  prepare.prepare(second, str(tmp / "two"), tokenizer=tokenizer, **QUIET)
  return f"{tmp / 'one'}:0.75,{tmp / 'two'}:0.25"


@pytest.fixture(scope="module")
def cli(tmp_path_factory, spec):
  base = tmp_path_factory.mktemp("cli")
  config = base / "prepared_config.py"
  config.write_text(
    "from tests.helpers import tiny_config\n\n\n"
    "def get_config():\n"
    "  c = tiny_config('', data=1)\n"
    f"  c.data.mixture = {spec!r}\n"
    f"  c.train.steps, c.train.eval_every = {STEPS}, {STEPS}\n"
    "  c.train.log_every, c.train.checkpoint_every = 1, 2\n"
    "  return c\n"
  )
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def start(workdir):
    command = [sys.executable, "-m", "moejax.train", "--config", str(config)]
    with open(base / "stderr.log", "a") as err:
      command += ["--workdir", str(workdir)]
      return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True
      )

  start.log = base / "stderr.log"
  return start


def _losses(workdir):
  return [(m["step"], m["loss"]) for m in metrics_lib.read_metrics(str(workdir)) if "loss" in m]


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  out, _ = cli(workdir).communicate(timeout=300)
  assert "moejax: done." in out, cli.log.read_text()[-3000:]
  return workdir


def test_sigkill_and_rerun_continue_with_identical_losses(cli, reference, spec, tmp_path):
  expected = dict(_losses(reference))
  assert sorted(expected) == list(range(1, STEPS + 1))
  proc = cli(tmp_path)
  deadline = time.monotonic() + 300
  while not (tmp_path / "checkpoints" / "4").is_dir():
    assert proc.poll() is None and time.monotonic() < deadline, cli.log.read_text()[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(step for step, _ in _losses(tmp_path))
  assert killed_at < STEPS
  out, _ = cli(tmp_path).communicate(timeout=300)
  assert "resumed from step" in out and "moejax: done." in out, out
  lines = _losses(tmp_path)
  assert {s for s, _ in lines} == set(range(1, STEPS + 1)) and len(lines) > STEPS  # re-done steps
  for step, loss in lines:
    assert loss == expected[step], (step, loss, expected[step])
  # The per-source token counts are the schedule's.
  data = mixture.open_source("", spec, seq_len=32, val_fraction=0.1, vocab_size=512)
  for m in metrics_lib.read_metrics(str(tmp_path)):
    if "loss" in m:
      assert {k: v for k, v in m.items() if k.startswith("data_tokens/")} == data.token_counts(
        m["step"], 8
      )


def test_evaluate_reads_the_runs_heldout_blocks(reference, tmp_path):
  last_eval = [m for m in metrics_lib.read_metrics(str(reference)) if "eval_loss" in m][-1]
  result = evaluate.main(
    ["--workdir", str(reference), "--mesh", "data=8", "--json", str(tmp_path / "r.json")]
  )
  assert result["loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-5)
  tokenizer = prepared_corpus.number_tokenizer(tmp_path / "tokenizer.json", 500)
  other = prepared_corpus.prepared_numbers(tmp_path, "other", tokenizer, 0, 500)
  with pytest.raises(shard_format.PreparedDataError, match=r"another tokenizer than the run"):
    evaluate.main(["--workdir", str(reference), "--mesh", "data=8", "--data", f"prepared:{other}"])


def test_bad_prepared_data_stops_before_compiling(spec, tmp_path, monkeypatch):
  def no_compile(*args, **kwargs):
    # Building the program wraps functions in jax.jit (nothing traced); running one compiles.
    def refuse(*args, **kwargs):
      raise AssertionError("compiled before the data error")

    return refuse

  monkeypatch.setattr(train.jax, "jit", no_compile)
  directory = spec.split(",")[0].rsplit(":", 1)[0]
  cfg = tiny_config(f"prepared:{directory}")
  cfg.model.vocab_size = 300
  with pytest.raises(
    shard_format.PreparedDataError, match=r"512 ids, more than model.vocab_size=300"
  ):
    train.run(cfg, str(tmp_path / "a"), progress=False)
  cfg = tiny_config("")
  cfg.data.mixture = f"{directory}:1,{directory}"
  with pytest.raises(shard_format.PreparedDataError, match=r"is not DIR:WEIGHT"):
    train.run(cfg, str(tmp_path / "b"), progress=False)
