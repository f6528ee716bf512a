r"""GShard top-2 (Lepikhin et al. 2020), decoder-only: top-2 gating with random routing.

Every other MLP is a mixture of experts; each token goes to its best expert and, at training
time, to its second best with probability min(1, 2 * g2) (random routing); capacity per expert per
group is 2 * ceil(S / E) * capacity_factor. GShard's capacity ranks every first choice before any
second choice, so a later token can take an earlier token's slot: the routing groups here are
formed by POSITION (`group_layout = "position"`, a group = one position of `group_size`
sequences), which keeps the decoder causal.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/gshard_top2.py --workdir /tmp/gshard_top2
CPU-sized member of the same family (the switch_base tiny preset with this router):
  python -m moejax.train --config configs/gshard_top2.py:tiny --workdir /tmp/gshard_tiny
"""

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # GShard's decoder stack dimensions (d_model 1024, 16 heads, d_ff 8192, MoE every other layer)
  # at 12 layers with 128 experts, top-2, capacity 2S/E (capacity_factor 1), aux loss 1e-2.
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 1024, 16, 8192
  m.activation = "relu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "gshard_top2", 128, 2
  moe.second_expert_policy = "random"
  moe.capacity_factor, moe.eval_capacity_factor = 1.0, 2.0
  # A group = one position of 256 sequences: causal, and S = 256 tokens compete for C = 4 slots.
  moe.group_layout, moe.group_size = "position", 256
  moe.aux_loss_weights.load_balance_loss = 1e-2
  moe.aux_loss_weights.router_z_loss = 0.0  # GShard has no z-loss (it came with ST-MoE)
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000

  if preset == "tiny":
    # configs/switch_base.py:tiny sizes and schedule, with this router. The batch of 16
    # sequences gives groups of the 16 tokens at one position (C = 2 * ceil(16/8) * 1.25 = 5).
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    m.activation = "gelu"
    moe.num_experts = 8
    moe.capacity_factor = 1.25
    moe.group_size = 16
    moe.aux_loss_weights.router_z_loss = 1e-3
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(f"configs/gshard_top2.py: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c
