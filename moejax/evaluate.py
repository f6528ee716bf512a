r"""Evaluate a trained run: loss, perplexity and what the experts do, on any mesh.

  python -m moejax.evaluate --workdir DIR [--step N] [--data GLOB] [--mesh data=8] [--json OUT]

Restores the latest (or `--step`) checkpoint of the run in DIR onto the devices at hand, then
reports, on the run's validation split (the same batches `moejax.train` evaluates) or on the
files of `--data` (all their full batches, or `--batches`):
- loss (mean token NLL in nats) and perplexity;
- per MoE layer: expert load [E] (fraction of routed (token, expert) pairs per expert),
  dropped fraction (pairs over capacity), router entropy, and the layer's other router metrics;
  each averaged over the batches.
The model runs in evaluation mode (no router noise, eval capacity factor), exactly as in the
evaluations of training, so on the validation split the loss equals the last logged `eval_loss`.
`--json OUT` writes the same numbers as JSON (`-` = stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from moejax import cli, errors, restore, train_step
from moejax.data import mixture, pipeline, shard_format, sources, tokenizer_files


def load_batches(cfg, workdir: str, data: str | None, num_batches: int | None):
  """Global host batches {inputs, targets: int32[B, L]}: the run's validation split (rebuilt
  exactly as training built it, from the run's `data` section), a prepared directory's held-out
  part (`prepared:DIR`), or all full batches of text files."""
  t = cfg.train
  if data is None:
    dataset = pipeline.build_dataset(
      cfg.data, workdir=workdir, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len
    )
    return dataset.eval_batches(t.batch_size, num_batches or cfg.data.eval_batches, None)
  if data.startswith(shard_format.PREFIX):
    return mixture.evaluation_batches(cfg, workdir, data, num_batches)
  documents = sources.load_documents(
    data, jsonl_field=cfg.data.jsonl_field, decode_errors=cfg.data.decode_errors
  )
  tokenizer = tokenizer_files.imported_tokenizer(workdir) or pipeline.run_tokenizer(
    cfg.data, workdir
  )
  tokens = pipeline.encode_documents(cfg.data.source, documents, tokenizer)
  blocks = pipeline.pack_blocks(tokens, t.seq_len)
  return pipeline.eval_batches(
    blocks,
    global_batch=t.batch_size,
    num_batches=num_batches or max(1, len(blocks) // t.batch_size),
  )


def evaluate(model: restore.RestoredModel, batches) -> dict:
  """Loss, perplexity and per-layer router metrics of `model` on host `batches`.

  Returns:
    {"step", "loss", "perplexity", "tokens", "layers": {"layer_1": {"expert_load": [E],
    "dropped_fraction": float, "router_entropy": float, ...}}}.
  """
  mesh, rules = model.mesh, model.rules
  batch_sharding = NamedSharding(mesh, rules.spec(("batch", "length")))
  with jax.set_mesh(mesh):
    step = jax.jit(train_step.make_eval_step(model.graphdef, model.cfg.train.loss_chunk))
    nll, count, sums = 0.0, 0.0, None
    for batch in batches:
      batch = {k: jax.device_put(np.asarray(v, np.int32), batch_sharding) for k, v in batch.items()}
      # Summed as in moejax.train's evaluation (device float32), so the losses agree exactly.
      b_nll, b_count, metrics = step(model.params, model.model_state, batch)
      nll, count = nll + b_nll, count + b_count
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
  loss = float(jax.device_get(nll / count))
  layers: dict[str, dict] = {}
  for name, value in jax.device_get(sums).items():
    layer, metric = name.split("/", 1)
    mean = np.asarray(value, np.float64) / len(batches)
    layers.setdefault(layer, {})[metric] = mean.tolist() if mean.ndim else float(mean)
  return {
    "step": model.step,
    "loss": loss,
    "perplexity": math.exp(min(loss, 80.0)),
    "tokens": int(jax.device_get(count)),
    "layers": layers,
  }


def format_report(result: dict) -> str:
  lines = [
    f"step {result['step']}: loss {result['loss']:.4f} perplexity {result['perplexity']:.2f} "
    f"over {result['tokens']} tokens"
  ]
  for layer, metrics in sorted(result["layers"].items(), key=lambda kv: int(kv[0].split("_")[1])):
    parts = []
    for name, value in sorted(metrics.items()):
      if isinstance(value, list):
        arr = np.asarray(value)
        ratio = arr.max() / max(arr.mean(), 1e-12)
        parts.append(f"{name} [{' '.join(f'{v:.3f}' for v in arr)}] (max/mean {ratio:.2f})")
      else:
        parts.append(f"{name} {value:.4f}")
    lines.append(f"  {layer}: " + "; ".join(parts))
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m moejax.evaluate", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--workdir", required=True, help="the run directory of moejax.train")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument(
    "--data", default=None, help="globs of .txt/.jsonl files, or prepared:DIR (its held-out part)"
  )
  parser.add_argument("--batches", type=int, default=None, help="batches to evaluate")
  parser.add_argument("--mesh", default="", help="e.g. data=2,expert=4 (default: the run's)")
  parser.add_argument("--json", default=None, help="write the results as JSON here ('-' stdout)")
  args = parser.parse_args(argv)
  if args.batches is not None and args.batches < 1:
    raise errors.ConfigError(f"--batches={args.batches}: must be >= 1")
  cfg = restore.load_run_config(args.workdir)
  mesh, rules = restore.make_inference_mesh(cfg, mesh_overrides=restore.parse_mesh(args.mesh))
  batches = load_batches(cfg, args.workdir, args.data, args.batches)
  model = restore.restore_model(args.workdir, cfg, mesh, rules, step=args.step)
  result = {"workdir": os.path.abspath(args.workdir), "data": args.data or "validation split"}
  result.update(evaluate(model, batches))
  if args.json == "-":
    json.dump(result, sys.stdout, indent=1)
    print()
  else:
    print(format_report(result))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  cli.run(main)
