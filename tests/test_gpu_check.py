"""`bash benchmarks/gpu_check.sh --cpu-smoke`: the accelerator check runs end to end on CPU."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(text: str, title: str) -> list[list[str]]:
  """Body rows (cells) of the first markdown table after the `### title` line."""
  block = text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
  rows = [line for line in block.splitlines() if line.startswith("|")]
  return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_cpu_smoke_prints_every_section(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, MOEJAX_WHEELS=str(tmp_path / "no_wheels"))
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the accelerator
  proc = subprocess.run(
    ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout

  stack = _table(out, "Stack")
  assert {row[0] for row in stack} >= {"jax", "flax", "optax", "orbax-checkpoint", "grain"}
  assert all(row[3] == "ok" for row in stack), stack

  ragged = _table(out, "jax.lax.ragged_dot")
  assert [row[0] for row in ragged] == ["4", "8"]
  for row in ragged:
    assert float(row[3]) > 0 and row[4]

  layer = _table(out, "MoE layer")
  got = {(row[0], int(row[1]), int(row[2])) for row in layer}
  want = {
    (d, e, k)
    for d in ("capacity", "dropless:blocked", "all_to_all")
    for e in (8, 128)
    for k in (1, 2)
  }
  want |= {("dropless:ragged_dot", 8, k) for k in (1, 2)}  # ragged_dot only at small E on CPU
  assert got == want
  for row in layer:
    if row[0] != "all_to_all":  # its time is the capacity path's on one device
      assert float(row[6]) > 0, row

  train = _table(out, "Train step")
  assert [row[0] for row in train] == ["dense twin", "capacity", "dropless"]
  for row in train:
    assert float(row[1]) > 0 and float(row[2]) > 0
    assert row[3] == "n/a (peak unknown)"  # CPUs have no peak in benchmarks/mfu.py
  assert re.search(r"gpu_check done in \d+ s", out)
