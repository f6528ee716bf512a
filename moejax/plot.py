r"""Charts of one or several runs from their metrics.jsonl (matplotlib, headless).

  python -m moejax.plot --workdir DIR [DIR ...] [--out OUT]

Writes into OUT (default: the first workdir's plots/):
- loss.png: training cross-entropy (solid) and validation loss (dots, dashed) of every run on one
  chart, against the step;
- expert_load_<run>.png: per MoE layer, a heatmap of the expert load over the logged steps
  (rows = experts, columns = steps; the fraction of routed (token, expert) pairs each expert got;
  uniform is 1/E): collapse shows as one bright row;
- routing.png: dropped fraction and router entropy of every MoE layer of every run against the
  step (colour = run, line style = layer).
A chart whose metric no run logged (e.g. Soft MoE has no expert load) is left out.
Design: the Agg backend is selected before pyplot is imported, so no display is ever needed;
the module only reads metrics.jsonl, so it also works on a run that is still training.
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np

from moejax import metrics as metrics_lib

_LAYER_METRIC = re.compile(r"^layer_(\d+)/(.+)$")
_STYLES = ("-", "--", ":", "-.")


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def load_runs(workdirs) -> dict[str, list[dict]]:
  """{run name: logged lines}; the name is the workdir's base name (made unique)."""
  runs = {}
  for workdir in workdirs:
    lines = metrics_lib.read_metrics(workdir)
    if not lines:
      raise FileNotFoundError(f"no metrics.jsonl with any line in {workdir!r}; train it first")
    name = os.path.basename(os.path.normpath(workdir)) or "run"
    unique, i = name, 2
    while unique in runs:
      unique, i = f"{name}_{i}", i + 1
    runs[unique] = lines
  return runs


def layer_series(lines: list[dict], metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """{layer: (steps [T], values [T] or [T, E])} of `layer_i/metric` over the lines that log it."""
  out: dict[int, tuple[list, list]] = {}
  for line in lines:
    for key, value in line.items():
      match = _LAYER_METRIC.match(key)
      if match and match.group(2) == metric:
        steps, values = out.setdefault(int(match.group(1)), ([], []))
        steps.append(line["step"])
        values.append(value)
  return {layer: (np.asarray(s), np.asarray(v, np.float64)) for layer, (s, v) in out.items()}


def plot_losses(runs: dict, path: str) -> str | None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for i, (name, lines) in enumerate(runs.items()):
    color = f"C{i % 10}"
    train = [(x["step"], x.get("cross_entropy", x.get("loss"))) for x in lines if "loss" in x]
    evals = [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x]
    if train:
      ax.plot(*zip(*train, strict=True), color=color, label=f"{name} train")
      drawn = True
    if evals:
      ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{name} eval")
      drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_expert_load(name: str, lines: list[dict], path: str) -> str | None:
  series = layer_series(lines, "expert_load")
  if not series:
    return None
  plt = _pyplot()
  layers = sorted(series)
  fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.4 * len(layers) + 0.6), squeeze=False)
  for ax, layer in zip(axes[:, 0], layers, strict=True):
    steps, load_te = series[layer]
    extent = (-0.5, len(steps) - 0.5, load_te.shape[1] - 0.5, -0.5)  # column t = logged step t
    image = ax.imshow(load_te.T, aspect="auto", interpolation="nearest", vmin=0.0, extent=extent)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set(
      ylabel="expert",
      title=f"{name}: layer {layer} expert load (uniform = {1 / load_te.shape[1]:.3f})",
    )
    fig.colorbar(image, ax=ax, label="fraction")
  axes[-1, 0].set_xlabel("step")
  return _save(fig, path)


def plot_routing(runs: dict, path: str) -> str | None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  drawn = False
  for ax, metric in zip(axes, ("dropped_fraction", "router_entropy"), strict=True):
    for i, (name, lines) in enumerate(runs.items()):
      for j, (layer, (steps, values)) in enumerate(sorted(layer_series(lines, metric).items())):
        ax.plot(
          steps,
          values,
          _STYLES[j % len(_STYLES)],
          color=f"C{i % 10}",
          label=f"{name} layer {layer}",
        )
        drawn = True
    ax.set(xlabel="step", title=metric.replace("_", " "))
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  if not drawn:
    plt.close(fig)
    return None
  axes[1].set_ylabel("nats")
  return _save(fig, path)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  _pyplot().close(fig)
  return path


def write_plots(workdirs, out: str | None = None) -> list[str]:
  """Writes every chart of the runs in `workdirs`; returns the PNG paths written."""
  workdirs = list(workdirs)
  if not workdirs:
    raise ValueError("write_plots needs at least one workdir")
  out = out or os.path.join(workdirs[0], "plots")
  os.makedirs(out, exist_ok=True)
  runs = load_runs(workdirs)
  paths = [
    plot_losses(runs, os.path.join(out, "loss.png")),
    plot_routing(runs, os.path.join(out, "routing.png")),
  ]
  for name, lines in runs.items():
    paths.append(plot_expert_load(name, lines, os.path.join(out, f"expert_load_{name}.png")))
  return [p for p in paths if p is not None]


def main(argv=None) -> list[str]:
  parser = argparse.ArgumentParser(prog="python -m moejax.plot", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", nargs="+", required=True, help="one or more run directories")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR[0]/plots)")
  args = parser.parse_args(argv)
  paths = write_plots(args.workdir, args.out)
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  from moejax import restore

  restore.run_cli(main)
