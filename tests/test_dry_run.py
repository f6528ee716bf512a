"""The dry run (moejax/dry_run.py): the real train step compiled for simulated devices, XLA's
memory per device beside the pre-flight estimate, the fit verdict and the JSON report."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from moejax import dry_run, errors
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_report_adds_up_and_judges_the_fit(tmp_path):
  cfg = tiny_config("unused", data=2, expert=4)
  cfg.model.scan_layers, cfg.model.remat = True, "full"
  report = dry_run.dry_run(cfg, jax.devices(), device_bytes=10 * 2**20, device_name="10 MiB")
  assert report["devices"] == 8 and report["mesh"]["expert"] == 4
  want = (
    report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
  )
  assert report["total_bytes_per_device"] == want > 0
  # The state is donated: the outputs reuse the arguments' buffers.
  assert report["alias_bytes"] >= 0.9 * report["output_bytes"]
  assert report["fits"] == (report["total_bytes_per_device"] <= 10 * 2**20)
  assert 0.5 < report["estimate_bytes_per_device"] / report["total_bytes_per_device"] < 2
  text = dry_run.format_report(report, "tiny")
  assert "temporaries" in text and "XLA:CPU" in text and "10 MiB" in text
  path = tmp_path / "report.json"
  dry_run.write_json(report, str(path))
  saved = json.loads(path.read_text())
  assert set(saved) >= {
    "devices",
    "mesh",
    "total_bytes_per_device",
    "estimate_bytes_per_device",
    "compile_seconds",
    "device_memory_bytes",
    "fits",
  }


def test_device_table_and_refusals():
  assert dry_run.device_memory("tpu-v5p", None) == (95 * 2**30, "tpu-v5p (95 GiB)")
  assert dry_run.device_memory(None, 16.0)[0] == 16 * 2**30
  with pytest.raises(errors.ConfigError, match="--device='tpu-v9' is not in the table"):
    dry_run.device_memory("tpu-v9", None)
  # This process's backend already has 8 devices.
  with pytest.raises(errors.ConfigError, match="--devices=3: JAX already has 8 CPU devices"):
    dry_run.use_simulated_devices(3)


def test_command_line_simulates_the_device_count(tmp_path):
  """A fresh process: --devices 16 starts JAX with 16 CPU devices; too little memory is
  reported as not fitting (exit 0: a dry run reports, it does not fail)."""
  out = tmp_path / "dry.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      "configs/switch_base.py:tiny",
      "--dry_run",
      "--devices",
      "16",
      "--device_memory_gib",
      "0.01",
      "--dry_run_json",
      str(out),
      "--config.mesh.expert=8",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "does NOT fit on 0.01 GiB device" in proc.stdout
  report = json.loads(out.read_text())
  assert report["devices"] == 16 and report["fits"] is False
  assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 8, "tensor": 1}
