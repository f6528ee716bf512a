"""Kill / preempt / corrupt / NaN: training always resumes from the last committed step.

The subprocess tests run the real CLI (`python -m moejax.train`) on one CPU device with a
persistent compilation cache, so each restart costs the imports and a cache hit, not a compile.
MOEJAX_FAULT_KILLS sets how many SIGKILLs the fault-injection test sends (default 20, the
acceptance number; fewer for a quick local run).
"""

import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax import checkpoint, faults, train
from moejax import metrics as metrics_lib
from tests.helpers import tiny_config, write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------ subprocess harness


@pytest.fixture(scope="module")
def cli(tmp_path_factory, corpus):
  """Runs the CLI on a tiny config: `cli(workdir)` -> Popen; env has a compilation cache."""
  base = tmp_path_factory.mktemp("cli")
  config = base / "fault_config.py"
  config.write_text(
    "from tests.helpers import tiny_config\n\n\n"
    "def get_config():\n"
    f"  c = tiny_config({corpus!r}, data=1)\n"
    f"  c.train.steps, c.train.eval_every = {STEPS}, {STEPS}\n"
    "  c.train.log_every, c.train.checkpoint_every, c.train.keep_checkpoints = 1, 1, 2\n"
    "  return c\n"
  )
  env = dict(os.environ)
  env.update(
    PYTHONPATH=str(ROOT),
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )

  def start(workdir):
    # stderr (Orbax / absl warnings) goes to a file: a full pipe would stall the child.
    with open(base / "stderr.log", "a") as err:  # the child keeps its own descriptor
      return subprocess.Popen(
        [sys.executable, "-m", "moejax.train", "--config", str(config), "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
      )

  start.log = base / "stderr.log"
  return start


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory):
  """An uninterrupted run: {step: loss} and its wall time (it also fills the compile cache)."""
  workdir = tmp_path_factory.mktemp("reference")
  start = time.time()
  out, _ = cli(workdir).communicate(timeout=300)
  assert "moejax: done." in out, cli.log.read_text()[-3000:]
  first_step = metrics_lib.read_metrics(str(workdir))[0]["time"]
  return {"losses": _logged_losses(workdir)[0], "startup": first_step - start}


def _logged_losses(workdir):
  """({step: loss}, [every (step, loss) line]) from metrics.jsonl."""
  lines = [(m["step"], m["loss"]) for m in metrics_lib.read_metrics(str(workdir)) if "loss" in m]
  return dict(lines), lines


def _committed_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return (
    sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if directory.exists()
    else []
  )


def _writes_in_flight(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return directory.exists() and any("tmp" in p.name for p in directory.iterdir())


def _kill_at_random_moment(proc, workdir, rng, startup_seconds):
  """SIGKILLs `proc` during start-up (1 in 5) or once 1-3 more checkpoints have committed plus
  a random fraction of a step; a checkpoint is written after every step, so most kills land
  during an async write. Returns (killed, a checkpoint write was in flight)."""
  if rng.random() < 0.2:
    deadline = time.time() + rng.uniform(0.3, min(startup_seconds, 5.0))
    while time.time() < deadline and proc.poll() is None:
      time.sleep(0.01)
  else:
    target = max(_committed_steps(workdir), default=0) + rng.randint(1, 3)
    deadline = time.time() + 120
    while max(_committed_steps(workdir), default=0) < target and proc.poll() is None:
      assert time.time() < deadline, "no progress"
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.1))
  if proc.poll() is not None:
    return False, False
  proc.send_signal(signal.SIGKILL)
  in_flight = _writes_in_flight(workdir)
  proc.wait()
  return True, in_flight


def test_sigkill_at_random_moments_resumes_exactly(cli, reference, tmp_path):
  kills = int(os.environ.get("MOEJAX_FAULT_KILLS", "20"))
  rng = random.Random(7)
  workdir = tmp_path / "run"
  killed, mid_write, resumed_from = 0, 0, []
  began = time.perf_counter()
  for _ in range(kills):
    expected = max(_committed_steps(workdir), default=None)
    proc = cli(workdir)
    was_killed, in_flight = _kill_at_random_moment(proc, workdir, rng, reference["startup"])
    killed, mid_write = killed + was_killed, mid_write + in_flight
    out, _ = proc.communicate()
    match = re.search(r"moejax: resumed from step (\d+)", out)
    if match:
      resumed_from.append(int(match.group(1)))
      assert int(match.group(1)) == expected, out  # the newest committed step
    elif expected is not None:  # killed before the restore: it cannot have saved anything
      assert max(_committed_steps(workdir)) == expected, out
    assert "unreadable" not in out, out
  out, _ = cli(workdir).communicate(timeout=300)
  assert "moejax: done." in out, cli.log.read_text()[-3000:]
  losses, lines = _logged_losses(workdir)
  # Every logged loss, including steps replayed after a kill, equals the uninterrupted run's.
  for step, loss in lines:
    assert loss == reference["losses"][step], (step, loss)
  assert sorted(losses) == list(range(1, STEPS + 1))
  print(
    f"\nfault injection: {kills} attempts, {killed} SIGKILLs ({mid_write} with a checkpoint "
    f"write in flight), resumed from {resumed_from}, {time.perf_counter() - began:.1f} s"
  )
  assert killed == kills  # every attempt was killed before the run ended


def test_sigterm_saves_and_exits_zero_then_resumes(cli, reference, tmp_path):
  workdir = tmp_path / "run"
  proc = cli(workdir)
  deadline = time.time() + 240
  while len(metrics_lib.read_metrics(str(workdir))) < 3 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, cli.log.read_text()[-3000:]
  last = out.strip().splitlines()[-1]
  match = re.fullmatch(r"moejax: stopped by SIGTERM at step (\d+); checkpoint saved, .*", last)
  assert match, out
  step = int(match.group(1))
  assert 3 <= step < STEPS
  assert max(_committed_steps(workdir)) == step
  out, _ = cli(workdir).communicate(timeout=300)
  assert f"moejax: resumed from step {step}" in out and "moejax: done." in out, cli.log.read_text()[
    -2000:
  ]
  for s, loss in _logged_losses(workdir)[1]:
    assert loss == reference["losses"][s], s


def test_second_signal_exits_at_once(monkeypatch):
  exits = []
  monkeypatch.setattr(os, "_exit", exits.append)
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background, else Python's
  with faults.StopSignal(multiprocess=False) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.should_stop(5) and stop.received == "SIGINT" and not exits
    os.kill(os.getpid(), signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]
  assert signal.getsignal(signal.SIGINT) is before  # restored


# ------------------------------------------------------------------ in-process runs


def _one_device_config(corpus, **train_values):
  cfg = tiny_config(corpus, data=1)
  for key, value in train_values.items():
    cfg.train[key] = value
  return cfg


def _run(cfg, workdir, **kwargs):
  return train.run(cfg, str(workdir), devices=jax.devices()[:1], progress=False, **kwargs)


@pytest.fixture(scope="module")
def clean_run(corpus, tmp_path_factory):
  """6 steps on one device with checkpoints at 2, 4, 6: losses and the workdir (copy it)."""
  cfg = _one_device_config(corpus, checkpoint_every=2, keep_checkpoints=3)
  work = tmp_path_factory.mktemp("clean") / "run"
  losses = _run(cfg, work, stop_at=6)["losses"]
  assert _committed_steps(work) == [2, 4, 6]
  return cfg, work, losses


def _saved_state(workdir, step):
  """The train state saved at `step`, read back without a target (numpy leaves)."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  with ocp.StandardCheckpointer() as reader:
    return jax.tree.map(np.asarray, reader.restore(path))


def test_corrupt_newest_checkpoint_falls_back_to_previous(clean_run, tmp_path, capsys):
  cfg, clean_work, first = clean_run
  work = tmp_path / "run"
  shutil.copytree(clean_work, work)
  # Truncate the largest array file of step 6.
  files = [p for p in (work / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  capsys.readouterr()
  second = _run(cfg, work)
  out = capsys.readouterr().out
  assert "moejax: checkpoint step 6 is unreadable (" in out and "falling back to step 4" in out
  assert "moejax: resumed from step 4" in out
  assert [second["losses"][s] for s in (5, 6)] == [first[s] for s in (5, 6)]
  assert (work / "checkpoints" / checkpoint.UNREADABLE_DIR).is_dir()  # kept, not deleted
  # Delete files of the newest step (8): the data item and the array metadata.
  for name in ("data", "state/_METADATA"):
    target = work / "checkpoints" / "8" / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
  cfg.train.steps = 10
  _run(cfg, work)
  out = capsys.readouterr().out
  assert "moejax: checkpoint step 8 is unreadable (" in out and "falling back to step 6" in out
  assert "moejax: resumed from step 6" in out


def test_nonfinite_halt_names_step_and_saves_nothing_after(corpus, tmp_path):
  cfg = _one_device_config(corpus, debug_poison_step=3, log_every=4, checkpoint_every=2)
  with pytest.raises(faults.NonFiniteError) as err:
    _run(cfg, tmp_path / "run")
  msg = str(err.value)
  assert "at step 3 " in msg and "train.nonfinite_policy='halt'" in msg and "\n" not in msg
  for name in ("loss", "cross_entropy", "grad_norm"):
    assert re.search(rf"\b{name}\b", msg.split(" at step")[0]), msg
  assert _committed_steps(tmp_path / "run") == [2]  # the poisoned step 4 was never saved


def test_nonfinite_skip_leaves_state_unchanged_and_counts(clean_run, corpus, tmp_path):
  _, clean_work, clean_losses = clean_run
  cfg = _one_device_config(corpus, debug_poison_step=3, nonfinite_policy="skip")
  cfg.train.checkpoint_every, cfg.train.keep_checkpoints = 1, 10
  poisoned = _run(cfg, tmp_path / "run")
  assert np.isnan(poisoned["losses"][3])
  assert [poisoned["losses"][s] for s in (1, 2)] == [clean_losses[s] for s in (1, 2)]
  assert all(np.isfinite(poisoned["losses"][s]) for s in range(4, 9))
  # Step 3's update was not applied: everything but the step counter is, bit for bit, the state
  # the same run saved after step 2.
  after_2, after_3 = _saved_state(tmp_path / "run", 2), _saved_state(tmp_path / "run", 3)
  assert int(after_2.pop("step")) == 2 and int(after_3.pop("step")) == 3
  for x, y in zip(jax.tree.leaves(after_2), jax.tree.leaves(after_3), strict=True):
    np.testing.assert_array_equal(x, y)
  # Before the poison the run follows the clean run, to rounding: the select that keeps the old
  # state changes XLA's fusion of the optimizer update (with jax 0.12 on CPU the param-update
  # loop recomputes the Adam moments instead of reading the stored ones, and that copy rounds
  # differently: 1 ulp in a few entries of one matrix). A separately compiled program gives no
  # bit-for-bit promise.
  clean_2 = _saved_state(clean_work, 2)
  assert int(clean_2.pop("step")) == 2
  for x, y in zip(jax.tree.leaves(clean_2), jax.tree.leaves(after_2), strict=True):
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_array_max_ulp(x, y, maxulp=2)
    else:
      np.testing.assert_array_equal(x, y)
  lines = metrics_lib.read_metrics(str(tmp_path / "run"))
  logged = {m["step"]: m for m in lines if "loss" in m}
  assert logged[2][faults.SKIPPED_KEY] == 0 and logged[3][faults.SKIPPED_KEY] == 1
  assert logged[3][faults.NONFINITE_KEY] > 0 and logged[4][faults.NONFINITE_KEY] == 0


def test_disk_full_while_saving_keeps_previous_checkpoint(clean_run, corpus, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  cfg = _one_device_config(corpus, checkpoint_every=2)
  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    _run(cfg, tmp_path / "run")
  msg = str(err.value)
  assert "saving checkpoint step 4" in msg and "No space left on device" in msg
  assert "step 2 is intact" in msg and "\n" not in msg
  assert _committed_steps(tmp_path / "run") == [2]
  # The kept step is complete: it reads back equal to an undisturbed run's step 2.
  for x, y in zip(
    jax.tree.leaves(_saved_state(tmp_path / "run", 2)),
    jax.tree.leaves(_saved_state(clean_run[1], 2)),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)
