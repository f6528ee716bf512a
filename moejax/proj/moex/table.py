r"""The MoE-X chess table from a finished `moejax/proj/moex/experiment.sh OUT_DIR` run.

  python -m moejax.proj.moex.table OUT_DIR [--layer 2] [--json docs/moex_results.json]
  python -m moejax.proj.moex.table --language LANG_DIR   # after moejax/proj/moex/language.sh

Reads OUT_DIR/<model>/eval.json (moejax.evaluate) and OUT_DIR/<model>/interpret_<layer>.json
(moejax.proj.moex.interpret), prints a markdown table with the paper's numbers beside ours, and
writes
{model_name: {val_loss, coverage, reconstruction, ...}} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

MODELS = ("dense_gelu", "dense_relu", "switch", "moex_scratch", "moex_upcycled")
LABELS = {
  "dense_gelu": "dense GELU",
  "dense_relu": "dense ReLU",
  "switch": "Switch (top-1)",
  "moex_scratch": "MoE-X from scratch",
  "moex_upcycled": "MoE-X upcycled (steps after upcycling)",
}
# Yang et al. 2025 (8 layers, d 512, 1023-character context); "-" = not given.
PAPER = {
  "dense_gelu": ("0.213", "0.356", "0.608"),
  "dense_relu": ("0.215", "0.312", "0.581"),
  "switch": ("0.212", "0.424", "0.734"),
  "moex_scratch": ("-", "0.398", "0.657"),
  "moex_upcycled": ("0.211", "0.428", "0.840"),
}


def mean_l0_correlation(evaluation: dict) -> float | None:
  """Mean over MoE layers of moex's score vs true-L0 rank correlation; None for other routers."""
  values = [
    m["score_l0_rank_corr"] for m in evaluation["layers"].values() if "score_l0_rank_corr" in m
  ]
  return float(np.mean(values)) if values else None


def collect_run(run_dir: str, layer: int) -> dict | None:
  """The row of one run directory (eval.json + interpret_<layer>.json), None if unfinished."""
  eval_path = os.path.join(run_dir, "eval.json")
  interp_path = os.path.join(run_dir, f"interpret_{layer}.json")
  if not (os.path.exists(eval_path) and os.path.exists(interp_path)):
    print(f"moex_table: no results yet in {run_dir}", file=sys.stderr)
    return None
  with open(eval_path) as f:
    evaluation = json.load(f)
  with open(interp_path) as f:
    interp = json.load(f)
  return {
    "val_loss": evaluation["loss"],
    "coverage": interp["coverage"],
    "reconstruction": interp["reconstruction"],
    "fraction_active": interp["fraction_active"],
    "score_l0_rank_corr": mean_l0_correlation(evaluation),
    "step": evaluation["step"],
    "layer": layer,
    "features": interp["features"],
    "alive_features": interp["alive_features"],
    "constant_feature_coverage": interp["constant_feature_coverage"],
    "constant_feature_reconstruction": interp["constant_feature_reconstruction"],
  }


def collect(out_dir: str, layer: int) -> dict:
  """{model: row} for every model of MODELS whose results exist under `out_dir`."""
  rows = {name: collect_run(os.path.join(out_dir, name), layer) for name in MODELS}
  return {name: row for name, row in rows.items() if row is not None}


def markdown(rows: dict, labels: dict | None = None) -> str:
  """Rows {name: row} as a markdown table; `labels` names rows that are not in MODELS."""
  labels = {**LABELS, **(labels or {})}
  fmt = lambda x: "–" if x is None else f"{x:.3f}"
  lines = [
    "| model | steps | val loss (nats/char) | coverage | reconstruction | fraction active | "
    "neurons (alive) | score/L0 corr | paper: val loss / coverage / recon |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {labels[name]} | {r['step']} | {r['val_loss']:.4f} | {fmt(r['coverage'])} | "
      f"{fmt(r['reconstruction'])} | {fmt(r['fraction_active'])} | "
      f"{r['features']} ({r['alive_features']}) | {fmt(r['score_l0_rank_corr'])} | "
      f"{' / '.join(PAPER.get(name, ('',)))} |"
    )
  if rows:
    any_row = next(iter(rows.values()))
    lines.append(
      f"\nOne always-active feature on the same positions: coverage "
      f"{any_row['constant_feature_coverage']:.3f}, reconstruction "
      f"{any_row['constant_feature_reconstruction']:.3f}."
    )
  return "\n".join(lines)


LANGUAGE_MODELS = {
  "dense_gelu": "dense GELU (d_ff 512)",
  "dense_relu": "dense ReLU (d_ff 512)",
  "switch": "Switch, 8 x 512, top-1",
  "moex": "MoE-X, 8 x 256 ReLU, top-2",
}


def language_markdown(lang_dir: str) -> str:
  """Validation loss / perplexity of each moejax/proj/moex/language.sh model found in lang_dir."""
  lines = ["| model | steps | val loss (nats/token) | val perplexity |", "|---|---|---|---|"]
  for name, label in LANGUAGE_MODELS.items():
    path = os.path.join(lang_dir, name, "eval.json")
    if os.path.exists(path):
      with open(path) as f:
        r = json.load(f)
      lines.append(f"| {label} | {r['step']} | {r['loss']:.4f} | {r['perplexity']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out_dir", nargs="?", help="moejax/proj/moex/experiment.sh's OUT_DIR")
  parser.add_argument("--layer", type=int, default=2)
  parser.add_argument("--json", default="docs/moex_results.json")
  parser.add_argument("--language", default=None, help="moejax/proj/moex/language.sh's OUT_DIR")
  parser.add_argument(
    "--extra",
    action="append",
    default=[],
    metavar="LABEL=RUN_DIR",
    help="another run, in a second table (not in the JSON)",
  )
  args = parser.parse_args(argv)
  if args.language:
    print(language_markdown(args.language))
  if not args.out_dir:
    return {}
  rows = collect(args.out_dir, args.layer)
  print(markdown(rows))
  extra = {}
  for item in args.extra:
    label, _, run_dir = item.rpartition("=")  # labels may hold "=", paths rarely do
    row = collect_run(run_dir, args.layer)
    if row is not None:
      extra[label] = row
  if extra:
    print()
    print(markdown(extra, labels={label: label for label in extra}))
  if rows and args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  return rows


if __name__ == "__main__":
  main()
