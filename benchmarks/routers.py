r"""Trains every router on the same data and budget and prints one comparison table.

  python -m benchmarks.routers [--steps 300] [--routers switch,gshard_top2,...] [--json OUT]

Each router runs its own recipe's `tiny` preset (configs/<recipe>.py:tiny: the Switch tiny sizes
with that router's settings) for the same number of steps, batch and sequence length, on the
embedded corpus. Columns: final validation loss and perplexity, expert load max/mean (1.0 =
perfectly balanced; averaged over MoE layers, last logged step), dropped fraction (of tokens no
expert took, for expert choice), tokens/s
(the median over rounds of steps timed round-robin across all routers in one process after the
training runs, so that machine load hits every router alike; `--speed-rounds 0` reports the
median over the run's logged intervals instead), and the first and last logged training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import numpy as np

from benchmarks.train_step import compiled_step, load_config, time_steps
from moejax import metrics as metrics_lib
from moejax import train

RECIPES = {
  "switch": "configs/switch_base.py:tiny",
  "gshard_top2": "configs/gshard_top2.py:tiny",
  "noisy_top_k": "configs/noisy_topk.py:tiny",
  "expert_choice": "configs/expert_choice.py:tiny",
  "soft_moe": "configs/soft_moe.py:tiny",
  "base": "configs/base_layers.py:tiny",
  "deepseek": "configs/deepseek_moe.py:tiny",
}


def summarise(workdir: str) -> dict:
  lines = metrics_lib.read_metrics(workdir)
  train_lines = [x for x in lines if "loss" in x]
  last = train_lines[-1]
  loads = [np.asarray(v) for k, v in last.items() if k.endswith("/expert_load")]
  # Expert choice drops no (token, expert) pair; its tokens that no expert took are the drops.
  drop_key = "/unrouted_fraction" if any(k.endswith("/unrouted_fraction") for k in last) else ""
  drops = [v for k, v in last.items() if k.endswith(drop_key or "/dropped_fraction")]
  evals = [x for x in lines if "eval_loss" in x]
  speeds = [x["tokens_per_second"] for x in train_lines[1:]] or [last["tokens_per_second"]]
  return {
    "first_train_loss": train_lines[0]["loss"],
    "last_train_loss": last["loss"],
    "eval_loss": evals[-1]["eval_loss"],
    "eval_perplexity": evals[-1]["eval_perplexity"],
    "load_max_over_mean": float(np.mean([x.max() / x.mean() for x in loads])) if loads else None,
    "dropped_fraction": float(np.mean(drops)) if drops else 0.0,
    "tokens_per_second_in_run": statistics.median(speeds),
  }


def interleaved_tokens_per_second(configs: dict, rounds: int, steps_per_round: int) -> dict:
  """{name: tokens/s}: median over rounds of train steps timed round-robin in one process.

  Timing every router in the same rounds makes a change in machine load hit all of them alike,
  so the ratios between routers stay meaningful on a shared machine.
  """
  compiled = {name: list(compiled_step(cfg)) for name, cfg in configs.items()}
  times = {name: [] for name in configs}
  for _ in range(rounds):
    for name, entry in compiled.items():
      entry[1], seconds = time_steps(*entry, steps_per_round)
      times[name] += seconds
  return {
    name: cfg.train.batch_size * cfg.train.seq_len / statistics.median(times[name])
    for name, cfg in configs.items()
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--routers", default=",".join(RECIPES))
  parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  parser.add_argument("--json", default=None)
  parser.add_argument(
    "--speed-rounds",
    type=int,
    default=5,
    help="then time every router's step round-robin, this many rounds (0: report in-run speed)",
  )
  parser.add_argument(
    "--report-only",
    action="store_true",
    help="summarise the finished runs in --workdir, train nothing",
  )
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="moejax_routers_")
  rows, configs = [], {}
  for name in args.routers.split(","):
    cfg = load_config(RECIPES[name])
    cfg.train.steps = args.steps
    cfg.train.eval_every = cfg.train.checkpoint_every = args.steps
    cfg.train.log_every = max(1, args.steps // 10)
    configs[name] = cfg
    workdir = os.path.join(root, name)
    if not args.report_only:
      train.run(cfg, workdir, progress=False)
    rows.append({"router": name, "recipe": RECIPES[name], **summarise(workdir)})
    rows[-1]["tokens_per_second"] = rows[-1]["tokens_per_second_in_run"]
    print(f"{name}: {rows[-1]}", flush=True)
  if args.speed_rounds:
    speeds = interleaved_tokens_per_second(configs, args.speed_rounds, steps_per_round=2)
    for r in rows:
      r["tokens_per_second"] = speeds[r["router"]]
  print()
  columns = ["router", "train loss first -> last", "eval loss", "eval ppl", "load max/mean"]
  columns += ["dropped", "tokens/s"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for r in rows:
    load = "n/a (soft)" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
    print(
      f"| {r['router']} | {r['first_train_loss']:.2f} -> {r['last_train_loss']:.2f} | "
      f"{r['eval_loss']:.3f} | {r['eval_perplexity']:.1f} | {load} | "
      f"{r['dropped_fraction']:.3f} | {r['tokens_per_second']:.0f} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
