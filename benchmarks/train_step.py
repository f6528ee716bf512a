r"""Train-step throughput: the MoE model vs a dense model of equal active FLOPs, in one process.

  python -m benchmarks.train_step [--config configs/switch_base.py:tiny] [--repeats 5] [--json OUT]
  python -m benchmarks.train_step --size 100m --repeats 2   # ~117M parameters, 8 experts
  python -m benchmarks.train_step --size 1b --dtype bfloat16  # ~1B, 16 experts top-2 (accelerator)

The dense baseline replaces every MoE layer by a dense MLP of hidden size top_k * d_expert, so
both models do the same matmul FLOPs per token (the MoE adds routing, dispatch and the capacity
slack). Prints tokens/s of each and their ratio (median of repeats after one warm-up step), and
model-FLOPs utilisation where the device's peak FLOP/s is known (benchmarks/mfu.py; GPU/TPU) or
given with --peak-tflops.
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

from benchmarks import mfu
from moejax import optim, train_step
from moejax.model import routers
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


def resize_100m(cfg):
  """~117M parameters (8 layers, d_model 512, d_ff 2048, 8 experts every other layer, vocab
  32000), batch 8 x 128: big enough that matmuls dominate, small enough for a CPU."""
  m, t = cfg.model, cfg.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 32_000, 8, 512, 8, 2048
  m.moe.num_experts, m.moe.top_k, m.moe.d_expert, m.moe.group_size = 8, 1, None, 256
  t.batch_size, t.seq_len = 8, 128
  return cfg


def resize_1b(cfg):
  """~0.92B parameters, 0.18B active: 12 layers, d_model 1024, 16 heads, every MLP an MoE of 16
  experts of width 2048, top-2 (dense baseline d_ff 4096), vocab 32000, batch 8 x 2048 tokens.
  Sized for one 80 GB accelerator; the capacity dispatch by default (`--dispatch` to change)."""
  m, t = cfg.model, cfg.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 32_000, 12, 1024, 16, 4096
  m.moe_every = 1
  m.moe.num_experts, m.moe.top_k, m.moe.d_expert, m.moe.group_size = 16, 2, 2048, 2048
  t.batch_size, t.seq_len = 8, 2048
  return cfg


SIZES = {"100m": resize_100m, "1b": resize_1b}


def compiled_step(cfg):
  """(step, state, batch): the jitted train step of `cfg`, warmed up, with a random batch."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(
    nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, cfg.train.seed
  )
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  weights = routers.loss_weights(cfg.model.moe)
  consistency = routers.consistency(cfg.model.moe)  # THOR: two passes per step
  step = jax.jit(
    train_step.make_train_step(
      graphdef,
      opt,
      weights,
      schedule,
      consistency=consistency,
      loss_chunk=cfg.train.loss_chunk,
      microbatches=cfg.train.microbatches,
    ),
    donate_argnums=0,
  )
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
  parser.add_argument(
    "--size",
    choices=("config", *SIZES),
    default="config",
    help="'100m' / '1b': resize_100m / resize_1b",
  )
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default=None,
    help="compute dtype (default: the config's)",
  )
  parser.add_argument("--dispatch", default=None, help="model.moe.dispatch (default: the config's)")
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="one device's peak, for MFU where mfu.py lacks it",
  )
  args = parser.parse_args()
  cfg = load_config(args.config)
  if args.size != "config":
    cfg = SIZES[args.size](cfg)
  if args.dtype:
    cfg.model.dtype = args.dtype
  if args.dispatch:
    cfg.model.moe.dispatch = args.dispatch
  tokens = cfg.train.batch_size * cfg.train.seq_len
  dense = dense_equivalent(cfg)
  moe_s = seconds_per_step(cfg, args.repeats)
  dense_s = seconds_per_step(dense, args.repeats)
  num_params = sum(
    x.size
    for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    )
  )
  device = jax.devices()[0].device_kind
  peak = args.peak_tflops * 1e12 if args.peak_tflops else None
  row = {
    "config": args.config + ("" if args.size == "config" else f" --size {args.size}"),
    "num_params": num_params,
    "active_matmul_params": mfu.active_matmul_params(cfg),
    "dtype": cfg.model.dtype,
    "dispatch": cfg.model.moe.dispatch,
    "device": device,
    "tokens_per_step": tokens,
    "moe_tokens_per_second": tokens / moe_s,
    "dense_tokens_per_second": tokens / dense_s,
    "time_ratio_vs_dense": moe_s / dense_s,
    "model_flops_per_token": mfu.model_flops_per_token(cfg),
    "moe_mfu": mfu.mfu(cfg, tokens / moe_s, device, peak),
    "dense_mfu": mfu.mfu(dense, tokens / dense_s, device, peak),
  }
  pct = lambda x: "n/a (peak unknown)" if x is None else f"{100 * x:.1f}%"
  print(
    "| config | params | dtype | device | MoE tok/s | dense tok/s | MoE time / dense time | "
    "MoE MFU | dense MFU |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  print(
    f"| {row['config']} | {num_params / 1e6:.0f}M | {row['dtype']} | {device} | "
    f"{row['moe_tokens_per_second']:.0f} | "
    f"{row['dense_tokens_per_second']:.0f} | {row['time_ratio_vs_dense']:.2f} | "
    f"{pct(row['moe_mfu'])} | {pct(row['dense_mfu'])} |"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump([row], f, indent=1)


if __name__ == "__main__":
  main()
