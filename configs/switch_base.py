r"""Switch Transformer (Fedus et al. 2021), decoder-only: Switch-Base sizes, top-1 routing.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/switch_base.py --workdir /tmp/switch_base
CPU-sized member of the same family (trains in minutes on 2 cores):
  python -m moejax.train --config configs/switch_base.py:tiny --workdir /tmp/switch_tiny
"""

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # Switch-Base: 12 layers, d_model 768, 12 heads, d_ff 3072, 128 experts, top-1, cf 1.25,
  # MoE every other layer, router z-loss and load-balancing loss.
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
    raise ValueError(f"configs/switch_base.py: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c
