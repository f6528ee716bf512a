"""The trunk every recipe in configs/ starts from, so that their results compare.

A recipe (configs/<name>.py) calls `switch_base_family(preset, recipe)` and changes only what its
router needs. `tiny` is the CPU-sized member of the family.
"""

from __future__ import annotations

import ml_collections

from moejax import config_lib


def switch_base_family(preset: str, recipe: str) -> ml_collections.ConfigDict:
  """The Switch-Base trunk every recipe in configs/ starts from (full size or preset `tiny`).

  Full: 12 layers, d_model 768, 12 heads, d_ff 3072, GELU, MoE every other layer, 128 experts,
  top-1 Switch routing, capacity factor 1.25 (eval 2.0). `tiny`: the CPU-sized member (4 layers,
  d_model 256, d_ff 512, 8 experts, vocab 2048, 600 steps of 16 x 128 tokens; CPU time: README).
  Recipes change only what their router needs, so their results compare.

  Args:
    preset: "" (full) or "tiny".
    recipe: the calling config file, named in the error for an unknown preset.
  """
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "gelu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "switch", 128, 1
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.group_size = 1024
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000
  if preset == "tiny":
    # Sized so the run takes < 10 minutes on 2 CPU cores (~0.55 s/step, compute bound).
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    moe.num_experts = 8
    moe.group_size = 256
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise config_lib.ConfigError(f"{recipe}: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c


def pod_training(c: ml_collections.ConfigDict, preset: str, recipe: str) -> None:
  """Training settings of the large-model recipes (configs/mixtral_8x7b.py, qwen3_moe_30b_a3b.py),
  in place, after the recipe has set its model shape.

  Full: bfloat16 compute, float32 parameters and moments, scanned layers with full remat,
  sequences of 4096 tokens, 64 per batch, FSDP over every device (docs/PERFORMANCE.md, "Dry
  runs"). `tiny`: float32, no remat, 16 x 128 tokens, 300 steps, data parallel; the recipe then
  shrinks its model.
  """
  m, t = c.model, c.train
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.scan_layers, m.remat = True, "full"
  t.steps, t.batch_size, t.seq_len = 100_000, 64, 4096
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 1000, 50
  c.optim.learning_rate, c.optim.warmup_steps = 3e-4, 2000
  c.mesh.data, c.mesh.fsdp = 1, -1
  if preset == "tiny":
    m.dtype, m.remat = "float32", "none"
    t.steps, t.batch_size, t.seq_len = 300, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 100, 100, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
    c.mesh.data, c.mesh.fsdp = -1, 1
  elif preset:
    raise config_lib.ConfigError(f"{recipe}: unknown preset {preset!r}; known: '' (full), 'tiny'")
