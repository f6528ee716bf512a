r"""XLA temporary bytes of the whole train step at sequence 4096 and 8192, per attention kernel.

  python -m benchmarks.attention_train_memory [--lengths 4096 8192] [--json OUT]

The same small model (2 layers, d_model 64, 4 query heads / 2 key-value heads, d_ff 128, MoE in
the second layer, vocabulary 512) and the same batch of 1 sequence, compiled on one CPU device
from abstract shapes (`compiled.memory_analysis().temp_size_in_bytes`, nothing allocated).
Everything but attention grows linearly with the length, so a kernel with linear memory gives a
ratio near 2 and the plain kernel, which keeps [H, L, L] float32 scores for the backward, near 4.
"""

from __future__ import annotations

import argparse
import json

from benchmarks import compile_time
from moejax import config_lib


def config(length: int, impl: str):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff, m.vocab_size = 2, 64, 4, 2, 128, 512
  m.attention_impl = impl
  moe.num_experts, moe.group_size = 4, 512
  t.batch_size, t.seq_len = 1, length
  return c


def temp_bytes(cfg) -> int:
  compiled = compile_time.lowered_step(cfg).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs=2, default=(4096, 8192))
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  short, long = args.lengths
  out = {}
  print(f"| kernel | L={short} temp MiB | L={long} temp MiB | ratio |")
  print("|---|---|---|---|")
  for impl in ("blockwise", "reference"):
    a, b = (temp_bytes(config(n, impl)) for n in (short, long))
    out[impl] = {short: a, long: b, "ratio": b / a}
    print(f"| {impl} | {a / 2**20:.1f} | {b / 2**20:.1f} | {b / a:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
