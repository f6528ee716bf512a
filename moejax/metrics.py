"""Metric logging: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Per-expert vectors (e.g. `layer_1/expert_load`, shape [E]) are written as lists in the JSONL and
as histograms + per-expert scalars in TensorBoard. Only the writing process (process 0) logs.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np


def to_python(metrics: dict) -> dict:
  """Host numpy/python values: scalars as floats, vectors as lists."""
  out = {}
  for name, value in metrics.items():
    arr = np.asarray(value)
    out[name] = float(arr) if arr.ndim == 0 else arr.astype(np.float64).tolist()
  return out


class MetricsWriter:
  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # lazy: heavy import, not needed by tests

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> dict:
    """Writes one line {step, time, **metrics}; returns the python-valued metrics."""
    values = to_python(metrics)
    if not self.enabled:
      return values
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, list):
          arr = np.asarray(value)
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


def read_metrics(workdir: str) -> list[dict]:
  """All logged lines of WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
