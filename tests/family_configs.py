"""Small configs of the router families added with the router seam (hash ... autonomy), shared by
their model-level tests: each is `tests.helpers.tiny_config` with the settings the family needs."""

from __future__ import annotations

import numpy as np

from tests.helpers import tiny_config

NEW_FAMILIES = ("hash", "top_p", "relu", "random", "smear", "peer", "autonomy")


def family_config(name: str, source: str = "unused", **mesh):
  """A 2-layer model (layer 1 is MoE, 4 experts, d_model 64) routed by family `name`."""
  c = tiny_config(source, **mesh)
  moe = c.model.moe
  moe.router = name
  if name in ("top_p", "relu", "random"):
    moe.dispatch = "dropless"  # causal in the 'sequence' layout (THOR: computes only its draw)
  if name == "relu":
    moe.relu.max_experts = moe.num_experts
  if name == "peer":
    moe.num_experts, moe.top_k, moe.d_expert = 16, 2, 1
    moe.peer.num_heads, moe.peer.query_dim, moe.peer.token_chunk = 2, 8, 64
    # Query batch norm over a group of one position of every sequence: causal.
    moe.group_layout, moe.group_size = "position", c.train.batch_size
  if name == "autonomy":
    moe.d_expert, moe.autonomy.d_low = 32, 8
  return c


def write_counts(path, vocab_size: int, seed: int = 0) -> str:
  """A Zipf-like counts file with some unseen ids; returns its path."""
  rng = np.random.default_rng(seed)
  counts = (1000 / np.arange(1, vocab_size + 1)).astype(np.int64)
  counts = rng.permutation(counts)
  counts[rng.choice(vocab_size, vocab_size // 10, replace=False)] = 0
  np.save(path, counts)
  return str(path)
