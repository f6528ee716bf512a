r"""Train-step throughput: the MoE model vs a dense model of equal active FLOPs, in one process.

  python -m benchmarks.train_step [--config configs/switch_base.py:tiny] [--repeats 5] [--json OUT]

The dense baseline replaces every MoE layer by a dense MLP of hidden size top_k * d_expert, so
both models do the same matmul FLOPs per token (the MoE adds routing, dispatch and the capacity
slack). Prints tokens/s of each and their ratio (median of repeats after one warm-up step).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import optim, train_step
from moejax.model.transformer import Transformer


def load_config(spec: str):
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset)


def dense_equivalent(cfg):
  """Same model with MoE layers replaced by dense MLPs of the same active FLOPs per token."""
  dense = copy.deepcopy(cfg)
  moe = cfg.model.moe
  d_active = moe.top_k * (moe.d_expert or cfg.model.d_ff)
  if d_active != cfg.model.d_ff:
    raise ValueError(
      f"dense baseline needs top_k * d_expert == d_ff, got {moe.top_k} * "
      f"{moe.d_expert or cfg.model.d_ff} != {cfg.model.d_ff}; set model.moe.d_expert"
    )
  dense.model.moe_every = 0
  return dense


def compiled_step(cfg):
  """(step, state, batch): the jitted train step of `cfg`, warmed up, with a random batch."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(
    nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, cfg.train.seed
  )
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  weights = dict(cfg.model.moe.aux_loss_weights)
  step = jax.jit(train_step.make_train_step(graphdef, opt, weights, schedule), donate_argnums=0)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  key = jax.random.key(0)
  batch = {
    "inputs": jax.random.randint(key, shape, 0, cfg.model.vocab_size, jnp.int32),
    "targets": jax.random.randint(jax.random.fold_in(key, 1), shape, 0, cfg.model.vocab_size),
  }
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  return step, state, batch


def time_steps(step, state, batch, repeats: int):
  """(state, [seconds of each of `repeats` steps])."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return state, times


def seconds_per_step(cfg, repeats: int) -> float:
  """Median step time after one warm-up step."""
  return statistics.median(time_steps(*compiled_step(cfg), repeats)[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/switch_base.py:tiny")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="write the row as JSON here")
  args = parser.parse_args()
  cfg = load_config(args.config)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  moe_s = seconds_per_step(cfg, args.repeats)
  dense_s = seconds_per_step(dense_equivalent(cfg), args.repeats)
  row = {
    "config": args.config,
    "device": jax.devices()[0].device_kind,
    "tokens_per_step": tokens,
    "moe_tokens_per_second": tokens / moe_s,
    "dense_tokens_per_second": tokens / dense_s,
    "time_ratio_vs_dense": moe_s / dense_s,
  }
  print("| config | device | MoE tok/s | dense tok/s | MoE time / dense time |")
  print("|---|---|---|---|---|")
  print(
    f"| {row['config']} | {row['device']} | {row['moe_tokens_per_second']:.0f} | "
    f"{row['dense_tokens_per_second']:.0f} | {row['time_ratio_vs_dense']:.2f} |"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump([row], f, indent=1)


if __name__ == "__main__":
  main()
