r"""Count the token ids of a run's training split: the input of a balanced hash table.

  python -m moejax.token_counts --config configs/hash_layers.py:tiny --workdir /tmp/hash \
      --out /tmp/hash/token_counts.npy [--config.data.source=...]

Builds the run's data exactly as training does (the tokenizer is trained in, or loaded from,
WORKDIR; then tokenize, pack, split) and writes one int64 count per token id (length
model.vocab_size) of the training blocks' inputs, the ids the hash router sees. Deterministic:
the same workdir, config and corpus give the same file. Then train in the same workdir (same
tokenizer) with --config.model.moe.hash.table=balanced --config.model.moe.hash.token_counts=FILE.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from moejax import cli, errors, paths
from moejax.data import pipeline


def count_training_tokens(cfg, workdir: str) -> np.ndarray:
  """int64[model.vocab_size]: how often each id is an input of the training split."""
  data = pipeline.build_dataset(
    cfg.data, workdir=workdir, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len
  )
  blocks = getattr(data, "train_blocks", None)
  if blocks is None:
    raise errors.ConfigError(
      f"data.source={cfg.data.source!r}: token counts need a source held in memory (text "
      "files or the embedded corpus); count prepared shards with numpy instead"
    )
  return np.bincount(np.asarray(blocks)[:, :-1].reshape(-1), minlength=cfg.model.vocab_size)


def write_counts(cfg, workdir: str, out_path: str) -> np.ndarray:
  """Counts (`count_training_tokens`) written to `out_path` as an int64 .npy; returns them."""
  counts = count_training_tokens(cfg, str(paths.workdir(workdir))).astype(np.int64)
  out = epath.Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:
    np.save(f, counts)
  return counts


def main():
  """The command line (flags are defined here, not at import: moejax.train defines the same)."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (with preset) of the run.")
  workdir = flags.DEFINE_string("workdir", None, "Run directory: its tokenizer is used or trained.")
  out = flags.DEFINE_string("out", None, "Where to write the .npy counts.")

  def run(argv):
    del argv
    if None in (config.value, workdir.value, out.value):
      raise app.UsageError("--config, --workdir and --out are required")
    counts = write_counts(config.value, workdir.value, out.value)
    print(f"moejax: {counts.sum()} tokens, {np.count_nonzero(counts)} distinct ids -> {out.value}")

  app.run(lambda argv: cli.run(run, argv))


if __name__ == "__main__":
  if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
  main()
