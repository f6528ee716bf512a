"""Two processes x 4 CPU devices through launch/local_multiprocess.sh (jax.distributed + gloo).

One module-scoped run serves every test (each process start costs imports and compilation):
  1. launch 2 processes, mesh {data: 2, expert: 4}, checkpoint every 2 steps;
  2. once checkpoint 2 is committed, SIGKILL process 1: process 0 must stop by itself (JAX's
     heartbeat check) with a message naming task 1, within the configured heartbeat timeout;
  3. launch again with the same arguments: it resumes and finishes the 8 steps.
The losses of both launches must equal an in-process single-process run on 8 devices, and the
final checkpoint (written by 2 processes) must restore on other meshes with identical parameters.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax import metrics as metrics_lib
from moejax import train
from tests.helpers import tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10  # short, but long enough for a starved process on a loaded 2-core machine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def _launch(workdir: Path, corpus: str, log: Path) -> subprocess.Popen:
  args = [
    "bash",
    str(ROOT / "launch/local_multiprocess.sh"),
    "--processes",
    "2",
    "--devices-per-process",
    "4",
    "--",
    "--config",
    "tests/tiny_cli_config.py",
    "--workdir",
    str(workdir),
    f"--config.data.source={corpus}",
    "--config.mesh.data=2",
    "--config.mesh.expert=4",
    "--config.train.checkpoint_every=2",
    f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
    "--config.distributed.initialization_timeout_s=120",
  ]
  env = {**os.environ, "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)  # the launcher sets 4 devices per process
  return subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
  )


def _pid_of_process(index: int, workdir: Path) -> int:
  """The python process with distributed.process_id=index training in `workdir`."""
  for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
    try:
      argv = cmdline.read_bytes().split(b"\0")
    except OSError:
      continue
    if (
      f"--config.distributed.process_id={index}".encode() in argv
      and str(workdir).encode() in argv
      and b"env" not in argv[:1]
      and any(b"python" in a for a in argv[:1])
    ):
      return int(cmdline.parent.name)
  raise AssertionError(f"no python process {index} for {workdir}")


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  workdir = base / "run"
  first = _launch(workdir, corpus, base / "first.log")
  try:
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "2").is_dir():
      assert first.poll() is None, (base / "first.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint 2 after 300 s"
      time.sleep(0.05)
    os.kill(_pid_of_process(1, workdir), signal.SIGKILL)
    killed_at = time.monotonic()
    first_rc = first.wait(timeout=HEARTBEAT_S + 60)
    stop_seconds = time.monotonic() - killed_at
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
      first.wait()
  second = _launch(workdir, corpus, base / "second.log")
  try:
    second_rc = second.wait(timeout=400)
  finally:
    if second.poll() is None:
      os.killpg(second.pid, signal.SIGKILL)
      second.wait()
  return {
    "workdir": workdir,
    "first_rc": first_rc,
    "first_log": (base / "first.log").read_text(),
    "stop_seconds": stop_seconds,
    "second_rc": second_rc,
    "second_log": (base / "second.log").read_text(),
  }


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """The same training in this process, on 8 devices with the same mesh and seed."""
  cfg = tiny_config(corpus, data=2, expert=4)
  cfg.train.checkpoint_every = 2
  return train.run(cfg, str(tmp_path_factory.mktemp("reference")), progress=False)


def test_lost_peer_stops_the_survivor(two_process_run):
  run = two_process_run
  log = run["first_log"]
  assert run["first_rc"] != 0, log[-3000:]
  # JAX's runtime names the lost task on the survivor ("[process 0]" lines), then aborts.
  assert re.search(r"\[process 0\].*stopped sending heartbeats\):\s*\n\[process 0\] 1\b", log), log[
    -3000:
  ]
  assert "process 0 exited with status 134" in log  # SIGABRT from the runtime, not a hang
  assert "process 1 exited with status 137" in log  # our SIGKILL
  print(f"survivor stopped {run['stop_seconds']:.1f} s after the kill (heartbeat {HEARTBEAT_S} s)")
  assert run["stop_seconds"] < HEARTBEAT_S + 10, run["stop_seconds"]


def test_restart_resumes_with_single_process_losses(two_process_run, reference):
  run = two_process_run
  assert run["second_rc"] == 0, run["second_log"][-3000:]
  resumed = re.search(r"resumed from step (\d+)", run["second_log"])
  assert resumed and 2 <= int(resumed.group(1)) < 8, run["second_log"][-3000:]
  # Process 0 logged every step of both launches (steps after the checkpoint twice).
  logged = [line for line in metrics_lib.read_metrics(str(run["workdir"])) if "loss" in line]
  assert {line["step"] for line in logged} == set(range(1, 9))
  for line in logged:
    ref = reference["losses"][line["step"]]
    assert line["loss"] == pytest.approx(ref, abs=1e-5), (line["step"], line["loss"], ref)


def _restore(workdir: Path, copy: Path, cfg, devices=None):
  """The state in `workdir`'s final checkpoint, restored by train.run on `cfg.mesh` (no steps)."""
  shutil.copytree(workdir, copy)
  return train.run(cfg, str(copy), devices=devices, progress=False)["state"]["params"]


def test_checkpoint_of_two_processes_restores_on_other_meshes(
  two_process_run, reference, corpus, tmp_path
):
  workdir = two_process_run["workdir"]
  wide = _restore(workdir, tmp_path / "wide", tiny_config(corpus, data=4, expert=2))
  one = _restore(workdir, tmp_path / "one", tiny_config(corpus, data=1), jax.devices()[:1])
  w_in = wide["blocks"][1]["ffn"]["experts"]["w_in"]
  assert w_in.sharding.spec[0] == "expert" and len(w_in.sharding.device_set) == 8
  flat_wide, flat_one, flat_ref = (
    jax.tree.leaves(p) for p in (wide, one, reference["state"]["params"])
  )
  assert len(flat_wide) == len(flat_one) == len(flat_ref)
  for a, b, ref in zip(flat_wide, flat_one, flat_ref, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref), atol=1e-5)


def test_missing_peer_ends_start_up_after_the_timeout(corpus, tmp_path):
  """Process 0 of 2 alone: it says what it waits for, then stops after initialization_timeout_s."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  start = time.monotonic()
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      "tests/tiny_cli_config.py",
      "--workdir",
      str(tmp_path),
      f"--config.data.source={corpus}",
      "--config.distributed.coordinator_address=127.0.0.1:1",
      "--config.distributed.num_processes=2",
      "--config.distributed.process_id=1",
      "--config.distributed.initialization_timeout_s=3",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  seconds = time.monotonic() - start
  assert out.returncode != 0
  assert "joining process 1 of 2 via 127.0.0.1:1 (config); waiting up to 3 s" in out.stdout
  assert "DEADLINE_EXCEEDED" in out.stderr, out.stderr[-2000:]
  assert seconds < 60, seconds  # imports + 3 s, not the default 300 s
