r"""Compile time of the train step vs depth, scanned and unscanned, measured side by side.

  python -m benchmarks.compile_time [--layers 4 48] [--json OUT]

A narrow model (d_model 64, 4 heads, d_ff 128, 4 experts every other layer, vocabulary 512,
batch 2 x 64) so that compiling, not tracing big arrays, is what is timed: `jit(step).lower(...)
.compile()` from abstract shapes (nothing allocated), on one CPU device. With `model.scan_layers`
the program holds one unit of layers whatever the depth, so the 48-layer compile should cost
about the 4-layer one; the unscanned program grows with depth. Timed: `lower` (tracing) and
`compile`, after one warm-up compile (JAX's and XLA's one-time start-up
costs), as wall seconds and as this process's CPU seconds (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from moejax import config_lib, training


def narrow_config(layers: int, scan: bool):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.num_layers, m.d_model, m.num_heads, m.d_ff, m.vocab_size = layers, 64, 4, 128, 512
  m.scan_layers = scan
  moe.num_experts, moe.group_size = 4, 64
  t.batch_size, t.seq_len = 2, 64
  return c


def lowered_step(cfg):
  """The train step of `cfg` lowered from abstract shapes (one device, nothing allocated)."""
  return training.program_for(cfg, jax.devices()[:1]).lower()


def compile_seconds(cfg) -> tuple[float, float]:
  """(wall, process CPU) seconds to lower and compile the train step of `cfg` (the abstract
  program, model and state shapes, is built before the clock starts)."""
  program = training.program_for(cfg, jax.devices()[:1])
  wall, cpu = time.perf_counter(), time.process_time()
  program.lower().compile()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, nargs=2, default=(4, 48))
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  shallow, deep = args.layers
  compile_seconds(narrow_config(shallow, True))  # warm-up
  rows = {}
  for scan in (True, False):
    for layers in (shallow, deep):
      rows[(scan, layers)] = compile_seconds(narrow_config(layers, scan))
  print(f"| layout | {shallow} layers s (CPU s) | {deep} layers s (CPU s) | ratio wall (CPU) |")
  print("|---|---|---|---|")
  for scan, name in ((True, "scanned"), (False, "unscanned")):
    (a, a_cpu), (b, b_cpu) = rows[(scan, shallow)], rows[(scan, deep)]
    ratio = f"{b / a:.2f} ({b_cpu / a_cpu:.2f})"
    print(f"| {name} | {a:.2f} ({a_cpu:.2f}) | {b:.2f} ({b_cpu:.2f}) | {ratio} |")
  if args.json:
    with open(args.json, "w") as f:
      out = {
        f"{'scan' if s else 'loop'}_{n}": {"wall": w, "cpu": c} for (s, n), (w, c) in rows.items()
      }
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
