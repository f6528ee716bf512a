"""Shared test helpers: a tiny config and a small synthetic corpus (fast on 2 CPU cores)."""

from __future__ import annotations

import random

from moejax import config_lib

_WORDS = (
  "the king queen lord lady sword crown night day love death ghost castle storm sea ship "
  "speak hear see come go stay fly run fight sing weep laugh rise fall and or but with from"
).split()


def write_corpus(directory, num_files: int = 4, words_per_file: int = 6000, seed: int = 0) -> str:
  """Writes text files of pseudo-sentences; returns the glob for data.source."""
  rng = random.Random(seed)
  for i in range(num_files):
    sentences = []
    for _ in range(words_per_file // 8):
      words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
      sentences.append(" ".join(words).capitalize() + ".")
    (directory / f"doc{i}.txt").write_text("\n".join(sentences))
  return str(directory / "*.txt")


def tiny_config(source: str, **mesh):
  """2 layers (one MoE), d_model 64, 4 experts: compiles and steps in seconds."""
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 512, 2, 64, 4, 128
  moe.num_experts, moe.top_k, moe.group_size = 4, 1, 64
  t.steps, t.batch_size, t.seq_len = 8, 8, 32
  t.log_every, t.eval_every, t.checkpoint_every = 1, 4, 4
  c.data.source, c.data.eval_batches, c.data.val_fraction = source, 2, 0.1
  c.optim.warmup_steps = 2
  for axis, size in {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh}.items():
    c.mesh[axis] = size
  return c
