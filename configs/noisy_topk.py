r"""Noisy top-k gating (Shazeer et al. 2017), decoder-only: sparsely-gated MoE with CV^2 losses.

Router logits get trainable Gaussian noise at training time, each token keeps its k best experts
with softmax gates over those k, and two losses (CV^2 of importance and of the smooth load)
balance the experts. Both router kernels start at zero, as in the paper. With k > 1 every first
choice outranks every second choice for capacity, so a later token could take an earlier token's
slot: the routing groups are formed by POSITION (`group_layout = "position"`, a group = one
position of `group_size` sequences), which keeps the decoder causal.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/noisy_topk.py --workdir /tmp/noisy_topk
CPU-sized member of the same family (the switch_base tiny preset with this router, k = 2):
  python -m moejax.train --config configs/noisy_topk.py:tiny --workdir /tmp/noisy_tiny
"""

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # Switch-Base-sized transformer (12 layers, d_model 768, d_ff 3072, MoE every other layer) with
  # the paper's flat MoE gating: 64 experts, k = 4, noise epsilon 1e-2, loss weights 1e-2 each
  # (the paper used 0.1 with its LSTM models).
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "relu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "noisy_top_k", 64, 4
  moe.noise_epsilon = 1e-2
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.group_layout, moe.group_size = "position", 256
  moe.aux_loss_weights.importance_loss = 1e-2
  moe.aux_loss_weights.load_loss = 1e-2
  moe.aux_loss_weights.load_balance_loss = 0.0  # not returned by this router
  moe.aux_loss_weights.router_z_loss = 0.0
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000

  if preset == "tiny":
    # configs/switch_base.py:tiny sizes and schedule, with this router at k = 2 (with k = 1 the
    # single gate is always 1 and the gate kernel would learn from the load loss only). Groups
    # are the 16 tokens at one position of the batch (C = ceil(1.25 * 16 * 2 / 8) = 5).
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    m.activation = "gelu"
    moe.num_experts, moe.top_k = 8, 2
    moe.group_size = 16
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(f"configs/noisy_topk.py: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c
