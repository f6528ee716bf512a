"""Plots from hand-written metrics.jsonl files (no training): series extraction and skipping."""

import json

import numpy as np
import pytest

from moejax import plot


def _write(workdir, lines):
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return str(workdir)


def _switch_lines():
  # Expert 0 of layer 1 collapses: its load goes 0.25 -> 0.55 -> 0.85 over steps 10, 20, 30.
  lines = []
  for i, top in enumerate([0.25, 0.55, 0.85]):
    rest = (1 - top) / 3
    lines.append(
      {
        "step": 10 * (i + 1),
        "loss": 5.0 - i,
        "cross_entropy": 4.9 - i,
        "layer_1/expert_load": [top, rest, rest, rest],
        "layer_1/dropped_fraction": 0.1 * i,
        "layer_1/router_entropy": 1.38 - 0.3 * i,
        "layer_3/expert_load": [0.25] * 4,
      }
    )
  lines.append({"step": 30, "eval_loss": 3.2, "eval_perplexity": 24.5})
  return lines


def test_layer_series_reads_every_logged_step():
  series = plot.layer_series(_switch_lines(), "expert_load")
  assert sorted(series) == [1, 3]
  steps, load = series[1]
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(load[:, 0], [0.25, 0.55, 0.85])
  assert load.shape == (3, 4)
  steps, dropped = plot.layer_series(_switch_lines(), "dropped_fraction")[1]
  np.testing.assert_allclose(dropped, [0.0, 0.1, 0.2])


def test_write_plots_skips_what_a_run_did_not_log(tmp_path):
  switch = _write(tmp_path / "switch", _switch_lines())
  # A Soft MoE-like run: losses only, no expert load, no dropping, no entropy.
  soft = _write(
    tmp_path / "soft", [{"step": s, "loss": 4.0, "cross_entropy": 4.0} for s in (10, 20)]
  )
  paths = plot.write_plots([switch, soft], out=str(tmp_path / "out"))
  names = sorted(p.rsplit("/", 1)[1] for p in paths)
  assert names == ["expert_load_switch.png", "loss.png", "routing.png"]
  only_soft = plot.write_plots([soft], out=str(tmp_path / "out2"))
  assert [p.rsplit("/", 1)[1] for p in only_soft] == ["loss.png"]


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    plot.write_plots([str(tmp_path)])
