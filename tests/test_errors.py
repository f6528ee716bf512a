"""Error policy: user errors are one line (exit 2), bugs keep their traceback; checkpoints are
moved aside only for damage; bucket workdirs are buckets or refused; evaluation rebuilds the
validation split with the run's own data settings."""

import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from etils import epath

from moejax import checkpoint, cli, errors, evaluate, paths, train
from moejax import metrics as metrics_lib
from moejax.data import tokenizer as tokenizer_lib
from tests.helpers import tiny_config, write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cli_turns_only_user_errors_into_one_line(capsys):
  def user_error():
    raise errors.ConfigError("model.d_model=0: must be a positive integer")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(user_error)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "moejax: error: model.d_model=0: must be a positive integer\n"

  def bug():
    raise ValueError("shapes (3,) and (4,) do not broadcast")  # an internal error

  with pytest.raises(ValueError, match="do not broadcast"):
    cli.run(bug)


BROKEN_ROUTER = """
import dataclasses

from moejax.model.routers import base, registry


@dataclasses.dataclass(frozen=True)
class Options:
  pass


@registry.register("broken")
class BrokenRouter(base.TokenChoiceRouter):
  Options = Options

  def __init__(self, *, d_model, moe, options, rngs):
    self.num_experts, self.top_k, self.options = moe.num_experts, 1, options

  def __call__(self, x_gsd, *, train, rng=None):
    raise ValueError("injected bug in routing")
"""

CONFIG = """
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import broken_router  # noqa: E402,F401

from tests.helpers import tiny_config  # noqa: E402


def get_config(preset=""):
  c = tiny_config({corpus!r})
  c.extensions = "broken_router"
  c.model.moe.router = "broken"
  return c
"""


def test_an_internal_error_keeps_its_traceback_and_exit_code(tmp_path):
  corpus = write_corpus(tmp_path, num_files=2, words_per_file=2000)
  (tmp_path / "broken_router.py").write_text(textwrap.dedent(BROKEN_ROUTER))
  (tmp_path / "config.py").write_text(CONFIG.format(corpus=corpus))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      str(tmp_path / "config.py"),
      "--workdir",
      str(tmp_path / "run"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode not in (0, 2), proc.stderr[-2000:]
  assert "Traceback (most recent call last)" in proc.stderr
  assert "ValueError: injected bug in routing" in proc.stderr
  assert "moejax: error:" not in proc.stderr


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A one-device run with checkpoints at steps 2 and 4."""
  base = tmp_path_factory.mktemp("saved")
  cfg = tiny_config(write_corpus(base, num_files=2, words_per_file=3000), data=1)
  cfg.train.checkpoint_every = 2
  train.run(cfg, str(base / "run"), devices=jax.devices()[:1], progress=False, stop_at=4)
  return cfg, base / "run"


@pytest.mark.parametrize(
  "failure",
  [
    MemoryError("host out of memory"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
    PermissionError(13, "Permission denied"),
    OSError(5, "Input/output error"),
  ],
  ids=["memory", "device-oom", "permission", "io"],
)
def test_a_restore_failure_that_is_not_damage_moves_nothing(saved_run, tmp_path, failure):
  cfg, saved = saved_run
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  real_restore = checkpoint.Checkpointer.restore

  def failing_restore(self, step, abstract_state):
    if step == 4:
      raise failure
    return real_restore(self, step, abstract_state)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "restore", failing_restore)
    with pytest.raises(type(failure)):
      train.run(cfg, str(work), devices=jax.devices()[:1], progress=False)
  steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  assert not (work / "checkpoints" / checkpoint.UNREADABLE_DIR).exists()


@pytest.mark.parametrize("other_host", ["failed", "damaged"])
def test_hosts_agree_before_a_step_is_moved_aside(saved_run, tmp_path, other_host):
  """Step 4 reads fine here but not on a second host (simulated through the status exchange):
  a failure there stops every host with nothing moved; damage there makes every host fall back
  to step 2 and move step 4 aside, as that host does."""
  cfg, saved = saved_run
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  remote = {"failed": checkpoint._FAILED, "damaged": checkpoint._DAMAGED}[other_host]
  seen = []

  def two_hosts(local):
    seen.append(local)
    return np.asarray([local, remote if len(seen) == 1 else checkpoint._OK])

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, "_agree", two_hosts)
    if other_host == "failed":
      with pytest.raises(errors.CheckpointError, match="failed to load on another host"):
        train.run(cfg, str(work), devices=jax.devices()[:1], progress=False)
    else:
      train.run(cfg, str(work), devices=jax.devices()[:1], progress=False, stop_at=4)
  assert seen[0] == checkpoint._OK  # this host read step 4 without error
  steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  if other_host == "failed":
    assert steps == [2, 4] and not (work / "checkpoints" / checkpoint.UNREADABLE_DIR).exists()
  else:  # fell back to 2, moved 4 aside, trained 3 and 4 again
    assert steps == [2, 4] and (work / "checkpoints" / checkpoint.UNREADABLE_DIR).is_dir()
    assert seen == [checkpoint._OK, checkpoint._OK]


def test_damage_classification():
  assert checkpoint.is_damage(FileNotFoundError(2, "No such file or directory"))
  assert checkpoint.is_damage(ValueError("DATA_LOSS: Error reading ... Unexpected end of data"))
  assert not checkpoint.is_damage(MemoryError())
  assert not checkpoint.is_damage(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  assert not checkpoint.is_damage(PermissionError(13, "Permission denied"))
  assert not checkpoint.is_damage(OSError(5, "Input/output error"))


def test_bucket_workdir_without_its_backend_is_refused_in_one_line(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"gs:// paths need the gcsfs package"):
    paths.workdir("gs://bucket/run")
  with pytest.raises(errors.ConfigError, match=r"not ftp://"):
    paths.resolve("ftp://host/run")
  assert paths.resolve("relative/run") == epath.Path(str(pathlib.Path("relative/run").resolve()))


def test_bucket_workdir_round_trips_through_a_fake_backend(tmp_path, monkeypatch):
  """gs:// paths stay gs:// paths: config.json, metrics and the tokenizer go through epath's
  gs backend (mapped here to a folder), never to a local folder named 'gs:'."""
  bucket_root = tmp_path / "bucket"
  to_local = lambda p: str(p).replace("gs://", f"{bucket_root}/")
  remap = lambda fn, path, *a, **k: fn(to_local(path), *a, **k)
  remap2 = lambda fn, path, dst, *a, **k: fn(to_local(path), to_local(dst), *a, **k)
  fake = dict(
    open=remap,
    exists=remap,
    isdir=remap,
    listdir=remap,
    makedirs=remap,
    mkdir=remap,
    remove=remap,
    stat=remap,
    rename=remap2,
    replace=remap2,
  )
  monkeypatch.setattr(paths, "backend_available", lambda package: True)
  monkeypatch.chdir(tmp_path)
  with epath.testing.mock_epath(**fake):
    run = paths.workdir("gs://bucket/run")
    assert str(run) == "gs://bucket/run"
    checkpoint.write_config(run, {"model": {"d_model": 64}})
    assert checkpoint.read_config("gs://bucket/run") == {"model": {"d_model": 64}}
    writer = metrics_lib.MetricsWriter(run)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0})
    assert [m["loss"] for m in metrics_lib.read_metrics(run)] == [2.5, 2.0]
    docs = ["to be or not to be that is the question " * 20] * 30
    made = tokenizer_lib.load_or_train(run / "tokenizer.model", docs, 300)
    again = tokenizer_lib.load_or_train(run / "tokenizer.model", [], 300)
    assert again.model_proto == made.model_proto
  assert (bucket_root / "bucket" / "run" / "config.json").is_file()
  assert (bucket_root / "bucket" / "run" / "metrics.jsonl").is_file()
  assert not (tmp_path / "gs:").exists()


def test_evaluate_rebuilds_the_validation_split_with_the_runs_decode_policy(tmp_path):
  """A run trained with data.decode_errors='skip' is evaluated on its own split (the bug:
  evaluate rebuilt it with the default 'fail' and stopped at the undecodable file)."""
  write_corpus(tmp_path, num_files=2, words_per_file=3000)
  (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 50)
  cfg = tiny_config(str(tmp_path / "*.txt"), data=1)
  workdir = str(tmp_path / "run")
  cfg.data.decode_errors = "skip"
  batches = evaluate.load_batches(cfg, workdir, None, 1)
  assert len(batches) == 1 and batches[0]["inputs"].shape == (8, 32)
  assert np.asarray(batches[0]["inputs"]).max() < cfg.model.vocab_size
  cfg.data.decode_errors = "fail"
  with pytest.raises(errors.DataError, match="is not UTF-8"):
    evaluate.load_batches(cfg, workdir, None, 1)
