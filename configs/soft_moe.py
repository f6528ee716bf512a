r"""Soft MoE (Puigcerver et al. 2023), decoder-only, at Switch-Base size.

Every expert owns P slots; each slot is a softmax-weighted mix of all tokens of its routing
group (dispatch: softmax over tokens), and each token a softmax-weighted mix of all slot outputs
(combine: softmax over slots). Tokens and slot parameters are l2-normalised and a learned scalar
scales the logits. No discrete choice, no dropping, no aux loss.

Soft MoE is NOT causal within a sequence (every slot mixes all tokens of its group, later ones
included), so the routing groups are formed by POSITION (`group_layout = "position"`: a group =
the tokens at one position of `group_size` sequences, which never holds a sequence's future;
see docs/causality.md). Then S = group_size.

Slots: the paper matches the number of slots to the number of tokens (compute of a dense layer
with E times the parameters); 128 experts x 2 slots = 256 slots for the S = 256 tokens of a
group. Kept from Switch-Base so the recipes compare: the trunk sizes, MoE every other layer, the
optimizer.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/soft_moe.py --workdir /tmp/soft_moe
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/soft_moe.py:tiny --workdir /tmp/soft_moe_tiny
"""

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # Switch-Base trunk: 12 layers, d_model 768, 12 heads, d_ff 3072, MoE every other layer.
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "gelu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "soft_moe", 128, 1  # top_k unused by this router
  moe.slots_per_expert = 2  # E * P = 256 slots = the group's 256 tokens
  moe.group_layout, moe.group_size = "position", 256  # a group = one position of 256 sequences
  # Soft MoE returns no aux losses; the weights are kept (every key exists) but unused.
  moe.aux_loss_weights.load_balance_loss = 0.0
  moe.aux_loss_weights.router_z_loss = 0.0
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000

  if preset == "tiny":
    # configs/switch_base.py:tiny sizes and schedule, with this router. The batch of 16
    # sequences gives groups of the 16 tokens at one position, and 8 experts x 2 slots = 16.
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    moe.num_experts = 8
    moe.group_size = 16  # must divide train.batch_size with group_layout 'position'
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(f"configs/soft_moe.py: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c
