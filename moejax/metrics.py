"""Metric logging: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Per-expert vectors (e.g. `layer_1/expert_load`, shape [E]) are written as lists in the JSONL and
as histograms + per-expert scalars in TensorBoard; an expert-load histogram has one bucket per
expert (bucket i = expert i, height = its load), see `add_expert_histogram`. Only the writing
process (process 0) logs.
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import logging

from moejax import paths


def to_python(metrics: dict) -> dict:
  """Host numpy/python values: scalars as floats, vectors as lists."""
  out = {}
  for name, value in metrics.items():
    arr = np.asarray(value)
    out[name] = float(arr) if arr.ndim == 0 else arr.astype(np.float64).tolist()
  return out


class MetricsWriter:
  """Appends to WORKDIR/metrics.jsonl (any epath workdir) and writes TensorBoard events.

  TensorBoard events are written for local workdirs only (tensorboardX writes local files); a
  bucket workdir logs one warning saying so and keeps metrics.jsonl.
  """

  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    directory = paths.resolve(workdir)
    self.path = directory / "metrics.jsonl"
    # Buckets cannot append: their file is rewritten whole from the lines kept here.
    self._lines = None
    if enabled and paths.is_url(directory):
      self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
    self._tb = None
    if enabled and tensorboard and paths.is_url(directory):
      logging.warning("TensorBoard events are not written to %s (local folders only)", directory)
    elif enabled and tensorboard:
      from tensorboardX import SummaryWriter  # lazy: heavy import, not needed by tests

      self._tb = SummaryWriter(str(directory / "tensorboard"))

  def write(self, step: int, metrics: dict) -> dict:
    """Writes one line {step, time, **metrics}; returns the python-valued metrics."""
    values = to_python(metrics)
    if not self.enabled:
      return values
    line = json.dumps({"step": int(step), "time": time.time(), **values}) + "\n"
    if self._lines is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      paths.write_atomically(self.path, "".join(self._lines))
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, list):
          arr = np.asarray(value)
          if name.endswith("expert_load"):
            add_expert_histogram(self._tb, name, arr, step)
          else:
            self._tb.add_histogram(name, arr, step)
          for i, v in enumerate(arr.reshape(-1)):
            self._tb.add_scalar(f"{name}/{i}", float(v), step)
        else:
          self._tb.add_scalar(name, value, step)
      self._tb.flush()
    return values

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def add_expert_histogram(tb, tag: str, load_e: np.ndarray, step: int) -> None:
  """A TensorBoard histogram whose bucket i is expert i and whose height is its load.

  TensorBoard's own histogram of the [E] values would show how many experts have each load;
  this one shows which expert gets what, so a collapse onto one expert is visible at a glance
  (bucket i spans (i, i+1]; the histograms tab stacks the steps).

  Args:
    load_e: float[E] fraction of routed pairs per expert.
  """
  load_e = np.asarray(load_e, np.float64).reshape(-1)
  centre = np.arange(load_e.size) + 0.5
  tb.add_histogram_raw(
    tag,
    min=0.0,
    max=float(load_e.size),
    num=float(load_e.sum()),
    sum=float(centre @ load_e),
    sum_squares=float((centre**2) @ load_e),
    bucket_limits=(np.arange(load_e.size) + 1.0).tolist(),
    bucket_counts=load_e.tolist(),
    global_step=step,
  )


def read_metrics(workdir) -> list[dict]:
  """All logged lines of WORKDIR/metrics.jsonl."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
