r"""Board-state interpretability of a chess run: BSP coverage and board reconstruction.

  python -m moejax.proj.moex.interpret --workdir DIR --layer L [--train-games 2000]
                                       [--val-games 500] [--step N] [--json OUT]

Restores the run in DIR (trained on a "chess:..." data source), runs its games through the model
and collects, at every move number's '.' (white to move), the layer-L feature code: z_hat of an
MoE layer ([E * d_expert] neurons, moejax/proj/moex/wide.py) or the hidden code of a dense MLP
([d_ff] neurons). Then moejax/proj/moex/board_metrics.py scores the neurons as detectors of the 768
piece-on-square properties (moejax/proj/moex/chess_board.py): coverage on the held-out games,
reconstruction labelled on training games and scored on held-out games. Also reported: the mean
fraction of active (nonzero) neurons per position, and both metrics for a single always-active
feature (the floor any model gets from properties that almost always hold, such as kings at
home early on). Prints a summary and writes JSON.

Games: the run's own split (every round(1/val_fraction)-th game is held out); each game is one
sequence, cut to train.seq_len characters (labels past the cut are dropped) and padded with
spaces after its end (causal attention: padding does not change earlier positions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import cli, errors, restore
from moejax.model.moe_layer import MoELayer
from moejax.proj.moex import board_metrics, chess_board, wide
from moejax.proj.moex import chess as chess_data


def layer_code(model, tokens_bl, layer: int):
  """The feed-forward code [B, L, K] of block `layer` (z_hat for MoE, hidden for a dense MLP).

  Runs blocks 0..layer-1 whole, then block `layer` up to its feed-forward input (the same
  computation as Block.__call__), so nothing after the wanted code is computed.
  """
  x = jnp.take(model.embed[...], tokens_bl, axis=0).astype(model.dtype)
  for block in model.blocks[:layer]:
    x, _, _ = block(x, train=False, rng=None)
  block = model.blocks[layer]
  h = block.ffn_norm(x + block.attention(block.attn_norm(x)))
  if isinstance(block.ffn, MoELayer):
    return wide.moe_hidden_code(block.ffn, h, train=False)
  return block.ffn.hidden(h)


def encode_padded(games: list[str], seq_len: int, batch_multiple: int):
  """int32[B, seq_len] of the games (cut, space-padded; B rounded up with copies of game 0)."""
  rows = len(games) + (-len(games)) % batch_multiple
  padded = [g[:seq_len].ljust(seq_len) for g in games]
  padded += [padded[0]] * (rows - len(games))
  return chess_data.encode_games(padded).reshape(rows, seq_len)


def collect(model, games: list[str], layer: int, *, seq_len: int, batch_size: int):
  """(activations float32[N, K], labels bool[N, 768]) at the labelled positions of `games`."""
  tokens = encode_padded(games, seq_len, batch_size)
  graphdef, state = nnx.split(model)
  code_fn = jax.jit(lambda st, t: layer_code(nnx.merge(graphdef, st), t, layer))
  acts, labels = [], []
  for start in range(0, len(games), batch_size):
    code = np.asarray(code_fn(state, tokens[start : start + batch_size]), np.float32)
    for row, game in enumerate(games[start : start + batch_size]):
      positions, boards = chess_board.board_labels(game)
      keep = positions < seq_len
      acts.append(code[row, positions[keep]])
      labels.append(boards[keep].reshape(-1, chess_board.NUM_PROPERTIES))
  return np.concatenate(acts), np.concatenate(labels)


def interpret(
  workdir: str, layer: int, *, train_games: int, val_games: int, step: int | None = None
) -> dict:
  cfg = restore.load_run_config(workdir)
  if not cfg.data.source.startswith(chess_data.PREFIX):
    raise errors.ConfigError(
      f"moejax.proj.moex.interpret needs a run trained on chess games; {workdir!r} has "
      f"data.source={cfg.data.source!r}"
    )
  if not 0 <= layer < cfg.model.num_layers:
    raise errors.ConfigError(f"--layer={layer}: the run has layers 0..{cfg.model.num_layers - 1}")
  games = chess_data.load_games(chess_data.parse_spec(cfg.data.source))
  train, val = chess_data.split_games(games, cfg.data.val_fraction)
  train, val = train[:train_games], val[:val_games]
  mesh, rules = restore.make_inference_mesh(cfg, devices=jax.devices()[:1])
  restored = restore.restore_model(workdir, cfg, mesh, rules, step=step)
  model = nnx.merge(restored.graphdef, restored.params, restored.model_state)
  sizes = {"seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size}
  with jax.set_mesh(mesh):
    acts_train, labels_train = collect(model, train, layer, **sizes)
    acts_val, labels_val = collect(model, val, layer, **sizes)
  cov = board_metrics.coverage(acts_val, labels_val)
  rec = board_metrics.reconstruction(acts_train, labels_train, acts_val, labels_val)
  # Reference: one always-active feature (it predicts the properties that almost always hold).
  ones = lambda labels: np.ones((len(labels), 1), np.float32)
  const_cov = board_metrics.coverage(ones(labels_val), labels_val)["coverage"]
  const_rec = board_metrics.reconstruction(
    ones(labels_train), labels_train, ones(labels_val), labels_val
  )["reconstruction"]
  return {
    "workdir": os.path.abspath(workdir),
    "step": restored.step,
    "layer": layer,
    "ffn": "moe" if cfg.model.moe_every and (layer + 1) % cfg.model.moe_every == 0 else "dense",
    "features": int(acts_val.shape[1]),
    "alive_features": int(np.sum(acts_train.max(axis=0) > 0)),
    "train_positions": int(len(acts_train)),
    "val_positions": int(len(acts_val)),
    "fraction_active": float(np.mean(acts_val != 0)),
    "coverage": cov["coverage"],
    "coverage_threshold": cov["threshold"],
    "coverage_per_threshold": cov["per_threshold"],
    "reconstruction": rec["reconstruction"],
    "reconstruction_threshold": rec["threshold"],
    "reconstruction_per_threshold": rec["per_threshold"],
    "labelled_features": rec["labelled_features"],
    "constant_feature_coverage": const_cov,
    "constant_feature_reconstruction": const_rec,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m moejax.proj.moex.interpret", description=__doc__)
  parser.add_argument("--workdir", required=True, help="a chess run's directory")
  parser.add_argument("--layer", type=int, required=True, help="block index, 0-based")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--train-games", type=int, default=2000, help="games to label features")
  parser.add_argument("--val-games", type=int, default=500, help="held-out games to score")
  parser.add_argument("--json", default=None, help="output JSON (default WORKDIR/interpret_L.json)")
  args = parser.parse_args(argv)
  for name in ("train_games", "val_games"):
    if getattr(args, name) < 1:
      raise errors.ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
  result = interpret(
    args.workdir,
    args.layer,
    train_games=args.train_games,
    val_games=args.val_games,
    step=args.step,
  )
  path = args.json or os.path.join(args.workdir, f"interpret_{args.layer}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(
    f"step {result['step']} layer {result['layer']} ({result['ffn']}, {result['features']} "
    f"neurons, {result['alive_features']} alive): coverage {result['coverage']:.3f} "
    f"(t={result['coverage_threshold']}), reconstruction {result['reconstruction']:.3f} "
    f"(t={result['reconstruction_threshold']}), fraction active {result['fraction_active']:.3f} "
    f"[one constant feature: coverage {result['constant_feature_coverage']:.3f}, reconstruction "
    f"{result['constant_feature_reconstruction']:.3f}]; "
    f"{result['train_positions']} train / {result['val_positions']} val positions -> {path}",
    file=sys.stdout,
  )
  return result


if __name__ == "__main__":
  cli.run(main)
