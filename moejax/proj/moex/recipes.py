"""The chess recipes of the MoE-X experiment (Yang et al. 2025): one trunk, four feed-forwards.

Every chess recipe (the presets of configs/moex_chess.py) starts from `chess_family`, so they
differ only in the feed-forward:
- dense: one MLP of width d_ff (GELU or ReLU);
- switch: 8 experts of width d_ff, top-1 (Switch Transformer);
- moex: 8 ReLU experts of width d_ff / 2, top-2, sparsity-aware `moex` routing.
Equal active parameters: each token runs through d_ff hidden units in every layer (the routers'
D x 8 matmuls aside). Every MLP is replaced by an MoE layer (moe_every 1), as in the paper.

Sizes:
- "" (paper): 8 layers, d_model 512, 8 heads, d_ff 2048, context 1023 characters; AdamW 3e-4
  cosine to 3e-5, warmup 2000, clip 1.0; 200k stockfish self-play games. Needs accelerators.
- "cpu": 4 layers, d_model 256, 4 heads, d_ff 1024, context 256; 10k stockfish games, 3000 steps
  of 16 x 256 characters (about 12M characters, 1.7 epochs); its CPU time: docs/MOEX.md.
  The measured table in docs/MOEX.md is shorter: 400 steps on 5k games
  (moejax/proj/moex/experiment.sh).
Routing groups are one position of `batch` sequences (group_layout 'position'): top-2 stays
causal and no capacity is involved (dispatch 'dropless': nothing is dropped).
"""

from __future__ import annotations

from moejax import config_lib, errors

PRESETS = ("", "cpu")
FFNS = ("dense_gelu", "dense_relu", "switch", "moex")


def chess_family(preset: str, ffn: str, recipe: str):
  """The chess config of size `preset` ("" or "cpu") with feed-forward `ffn` (see FFNS)."""
  if preset not in PRESETS:
    raise errors.ConfigError(f"{recipe}: unknown chess preset {preset!r}; known: {PRESETS}")
  c = config_lib.default_config()
  c.extensions = "moejax.proj.moex"  # registers the "chess:" data source
  m, moe, t, o = c.model, c.model.moe, c.train, c.optim
  m.vocab_size = 32  # moejax/proj/moex/chess.py VOCAB
  if preset == "":
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 8, 512, 8, 2048
    t.steps, t.batch_size, t.seq_len = 60_000, 64, 1023
    t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
    o.learning_rate, o.warmup_steps = 3e-4, 2000
    c.data.source = "chess:stockfish:200000"
  else:
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 1024
    t.steps, t.batch_size, t.seq_len = 3000, 16, 256
    t.eval_every, t.checkpoint_every, t.log_every = 500, 500, 50
    o.learning_rate, o.warmup_steps = 1e-3, 100
    c.data.source = "chess:stockfish:10000"
  o.end_lr_ratio, o.grad_clip = 0.1, 1.0
  c.data.val_fraction, c.data.eval_batches = 0.05, 16
  moe.group_layout, moe.group_size, moe.dispatch = "position", t.batch_size, "dropless"
  moe.num_experts = 8
  if ffn == "dense_gelu":
    m.moe_every, m.activation = 0, "gelu"
  elif ffn == "dense_relu":
    m.moe_every, m.activation = 0, "relu"
  elif ffn == "switch":
    m.moe_every, m.activation = 1, "gelu"
    moe.router, moe.top_k, moe.d_expert = "switch", 1, m.d_ff
  elif ffn == "moex":
    m.moe_every, m.activation = 1, "relu"
    moe.router, moe.top_k, moe.d_expert = "moex", 2, m.d_ff // 2
  else:
    raise errors.ConfigError(f"{recipe}: unknown chess feed-forward {ffn!r}; known: {FFNS}")
  return c
