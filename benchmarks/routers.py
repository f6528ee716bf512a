r"""Trains every router on the same data and budget and prints one comparison table.

  python -m benchmarks.routers [--steps 300] [--seeds 2] [--routers switch,gshard_top2,...]
      [--workdir DIR] [--json OUT]

Each router runs its own recipe's `tiny` preset (configs/<recipe>.py:tiny: the Switch tiny sizes
with that router's settings) for the same number of steps, batch and sequence length, on the
embedded corpus, once per seed (train.seed = 0, 1, ...: initialisation, router draws and data
order); seeds are the outer loop, so an interrupted benchmark has one seed of every router first,
`--report-only` prints the table of the finished runs and names the missing ones, and rerunning
the same command continues (finished runs resume at their last step and train nothing more).
`hash_balanced` is the hash recipe with the balanced table, its token counts written
first from that run's tokenizer and training split (moejax/token_counts.py).

Columns: validation loss at the last step, mean over seeds and each seed's value; the rank (1 +
the routers whose WORST seed beats this router's BEST seed: equal ranks are not separated by
the seeds); perplexity of the mean loss; the validation loss again with
model.moe.eval_dispatch='dropless' (no capacity drops at evaluation; '=' where the router has
no capacity to drop from); the dropped fraction at evaluation (eval capacity factor) and in the
last logged training step (of tokens no expert took, for expert choice); expert load max/mean
(1.0 = perfectly balanced; averaged over MoE layers, last logged step); the training
cross-entropy per forward pass at the first and last logged step (THOR runs two); tokens/s (the
median over rounds of steps timed round-robin across all routers in one process after the
training runs, so that machine load hits every router alike; `--speed-rounds 0` reports the
median over the run's logged intervals instead). Charts of all routers (moejax/plot.py) go to
WORKDIR/plots unless --no_plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile

import jax
import numpy as np

from benchmarks.train_step import compiled_step, load_config, time_steps
from moejax import evaluate, plot, restore, token_counts, train
from moejax import metrics as metrics_lib
from moejax.model import routers

RECIPES = {
  "switch": "configs/switch_base.py:tiny",
  "gshard_top2": "configs/gshard_top2.py:tiny",
  "noisy_top_k": "configs/noisy_topk.py:tiny",
  "expert_choice": "configs/expert_choice.py:tiny",
  "soft_moe": "configs/soft_moe.py:tiny",
  "base": "configs/base_layers.py:tiny",
  "deepseek": "configs/deepseek_moe.py:tiny",
  "hash": "configs/hash_layers.py:tiny",
  "hash_balanced": "configs/hash_layers.py:tiny",
  "top_p": "configs/top_p.py:tiny",
  "relu": "configs/remoe.py:tiny",
  "random": "configs/thor.py:tiny",
  "smear": "configs/smear.py:tiny",
  "peer": "configs/peer.py:tiny",
  "autonomy": "configs/autonomy.py:tiny",
}


def prepare(name: str, cfg, workdir: str) -> None:
  """`hash_balanced`: writes the run's token counts and selects the balanced table."""
  if name == "hash_balanced":
    counts_path = os.path.join(workdir, "token_counts.npy")
    if not os.path.exists(counts_path):
      os.makedirs(workdir, exist_ok=True)
      token_counts.write_counts(cfg, workdir, counts_path)
    cfg.model.moe.hash.table, cfg.model.moe.hash.token_counts = "balanced", counts_path


def dropped(layer_metrics: dict) -> float | None:
  """Mean over MoE layers of `dropped_fraction` (expert choice: `unrouted_fraction`)."""
  key = "/unrouted_fraction" if any(k.endswith("/unrouted_fraction") for k in layer_metrics) else ""
  values = [v for k, v in layer_metrics.items() if k.endswith(key or "/dropped_fraction")]
  return float(np.mean(values)) if values else None


def evaluate_run(workdir: str, dropless: bool) -> tuple[float, float | None]:
  """(validation loss, mean eval dropped fraction) of the run's last checkpoint, optionally with
  model.moe.eval_dispatch='dropless', on one device."""
  cfg = restore.load_run_config(workdir)
  if dropless:
    cfg.model.moe.eval_dispatch = "dropless"
  mesh, rules = restore.make_inference_mesh(cfg, devices=jax.devices()[:1])
  batches = evaluate.load_batches(cfg, workdir, None, None)
  result = evaluate.evaluate(restore.restore_model(workdir, cfg, mesh, rules), batches)
  flat = {f"{layer}/{k}": v for layer, m in result["layers"].items() for k, v in m.items()}
  return result["loss"], dropped(flat)


def has_capacity_drops(cfg) -> bool:
  """Whether evaluation uses a capacity the pairs compete for (a dropless eval can differ)."""
  moe = cfg.model.moe
  cls = routers.get(moe.router)
  no_dispatch = cls.COMPUTES_OUTPUT or moe.router in ("soft_moe", "expert_choice")
  return not no_dispatch and (moe.eval_dispatch or moe.dispatch) != "dropless"


def finished(workdir: str, steps: int) -> bool:
  """Whether the run in `workdir` logged its evaluation at step `steps`."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return False
  return any(x.get("step") == steps and "eval_loss" in x for x in metrics_lib.read_metrics(workdir))


def summarise(workdir: str, passes: int) -> dict:
  lines = metrics_lib.read_metrics(workdir)
  train_lines = [x for x in lines if "loss" in x]
  last = train_lines[-1]
  loads = [np.asarray(v) for k, v in last.items() if k.endswith("/expert_load")]
  evals = [x for x in lines if "eval_loss" in x]
  speeds = [x["tokens_per_second"] for x in train_lines[1:]] or [last["tokens_per_second"]]
  return {
    "first_train_ce": train_lines[0]["cross_entropy"] / passes,
    "last_train_ce": last["cross_entropy"] / passes,
    "eval_loss": evals[-1]["eval_loss"],
    "load_max_over_mean": float(np.mean([x.max() / x.mean() for x in loads])) if loads else None,
    "dropped_fraction": dropped(last) or 0.0,
    "tokens_per_second_in_run": statistics.median(speeds),
  }


def aggregate(name: str, seed_rows: list[dict]) -> dict:
  """One router's row: means over seeds, each seed's eval loss, its best and worst."""
  mean = lambda key: (
    None if seed_rows[0][key] is None else float(np.mean([r[key] for r in seed_rows]))
  )
  losses = [r["eval_loss"] for r in seed_rows]
  row = {"router": name, "recipe": seed_rows[0]["recipe"], "seeds": seed_rows}
  for key in seed_rows[0]:
    if key not in ("router", "recipe", "seed") and isinstance(
      seed_rows[0][key], (float, type(None))
    ):
      row[key] = mean(key)
  row.update(eval_losses=losses, best=min(losses), worst=max(losses))
  return row


def rank(rows: list[dict]) -> None:
  """rank = 1 + the routers whose worst seed is better than this router's best seed."""
  for r in rows:
    r["rank"] = 1 + sum(o["worst"] < r["best"] for o in rows if o is not r)


def print_table(rows: list[dict]) -> None:
  columns = ["router", "eval loss: mean (seeds)", "rank", "eval ppl", "eval loss, dropless eval"]
  columns += ["dropped eval / train", "load max/mean", "train CE first -> last", "tokens/s"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for r in sorted(rows, key=lambda r: r["eval_loss"]):
    load = "n/a" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
    seeds = ", ".join(f"{x:.3f}" for x in r["eval_losses"])
    dropless = "=" if r["eval_loss_dropless"] is None else f"{r['eval_loss_dropless']:.3f}"
    eval_drop = "n/a" if r["eval_dropped"] is None else f"{r['eval_dropped']:.3f}"
    print(
      f"| {r['router']} | {r['eval_loss']:.3f} ({seeds}) | {r['rank']} | "
      f"{math.exp(r['eval_loss']):.1f} | {dropless} | {eval_drop} / {r['dropped_fraction']:.3f} | "
      f"{load} | {r['first_train_ce']:.2f} -> {r['last_train_ce']:.2f} | "
      f"{r['tokens_per_second']:.0f} |"
    )


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
  parser.add_argument("--seeds", type=int, default=2, help="runs per router, train.seed 0..N-1")
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
    help="summarise the finished runs in --workdir (a partial table if some are missing)",
  )
  parser.add_argument("--no_plots", action="store_true", help="skip the charts")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="moejax_routers_")
  names = args.routers.split(",")
  seed_rows, configs, workdirs, missing = {name: [] for name in names}, {}, [], []
  # Seeds outermost: an interrupted run has one seed of every router before any second seed.
  for seed in range(args.seeds):
    for name in names:
      cfg = load_config(RECIPES[name])
      cfg.train.steps, cfg.train.seed = args.steps, seed
      cfg.train.eval_every = args.steps
      cfg.train.checkpoint_every = max(1, args.steps // 3)  # an interrupted run loses <= 1/3
      cfg.train.log_every = max(1, args.steps // 10)
      workdir = os.path.join(root, f"{name}_seed{seed}")  # plots name runs by folder
      if args.report_only and not finished(workdir, args.steps):
        missing.append(f"{name} seed {seed}")
        continue
      prepare(name, cfg, workdir)
      if not args.report_only:
        train.run(cfg, workdir, progress=False)
      configs.setdefault(name, cfg)
      workdirs.append(workdir)
      passes, _ = routers.consistency(cfg.model.moe)
      row = {"router": name, "recipe": RECIPES[name], "seed": seed}
      row.update(summarise(workdir, passes))
      row["eval_loss_dropless"] = (
        evaluate_run(workdir, dropless=True)[0] if has_capacity_drops(cfg) else None
      )
      row["eval_dropped"] = evaluate_run(workdir, dropless=False)[1]
      seed_rows[name].append(row)
      print(f"{name} seed {seed}: {row}", flush=True)
  rows = [aggregate(name, seed_rows[name]) for name in names if seed_rows[name]]
  for r in rows:
    r["tokens_per_second"] = r["tokens_per_second_in_run"]
  if args.speed_rounds:
    speeds = interleaved_tokens_per_second(configs, args.speed_rounds, steps_per_round=2)
    for r in rows:
      r["tokens_per_second"] = speeds[r["router"]]
  rank(rows)
  print()
  print_table(rows)
  if missing:
    print(f"\nPARTIAL: not finished (rerun the same command without --report-only): {missing}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  if not args.no_plots:
    paths = plot.write_plots(workdirs, out=os.path.join(root, "plots"))
    print(f"charts: {', '.join(paths)}")


if __name__ == "__main__":
  main()
