r"""Train-step tokens/s of this tree against another git revision (default main), in one run.

  python -m benchmarks.versus_main [--ref main] [--configs configs/switch_base.py:tiny ...]
      [--rounds 3] [--repeats 5] [--json OUT]

The revision is checked out into a temporary git worktree; `python -m benchmarks.train_step`
then runs in alternating subprocesses (ref, this tree, ref, this tree, ...) so that both see the
same machine load, and the median tokens/s of each side and their ratio are printed per config
(the MoE model's tokens/s; benchmarks/train_step.py times the median of `--repeats` steps after a
warm-up step).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tokens_per_second(tree: pathlib.Path, config: str, repeats: int) -> float:
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--config", config]
    cmd += ["--repeats", str(repeats), "--json", out.name]
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    return json.loads(pathlib.Path(out.name).read_text())[0]["moe_tokens_per_second"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ref", default="main")
  parser.add_argument(
    "--configs",
    nargs="+",
    default=["configs/switch_base.py:tiny", "configs/deepseek_moe.py:tiny"],
  )
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    ref_tree = pathlib.Path(tmp) / "ref"
    subprocess.run(
      ["git", "worktree", "add", "--detach", str(ref_tree), args.ref],
      cwd=ROOT,
      check=True,
      capture_output=True,
    )
    try:
      rows = {}
      for config in args.configs:
        samples = {"ref": [], "tree": []}
        for _ in range(args.rounds):
          samples["ref"].append(tokens_per_second(ref_tree, config, args.repeats))
          samples["tree"].append(tokens_per_second(ROOT, config, args.repeats))
        rows[config] = {k: statistics.median(v) for k, v in samples.items()}
        rows[config]["samples"] = samples
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT)
  print(f"| config | {args.ref} tok/s | this tree tok/s | ratio |")
  print("|---|---|---|---|")
  for config, row in rows.items():
    print(f"| {config} | {row['ref']:.0f} | {row['tree']:.0f} | {row['tree'] / row['ref']:.3f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
