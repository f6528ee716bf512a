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

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/gshard_top2.py")
  m, moe = c.model, c.model.moe
  moe.router, moe.top_k = "gshard_top2", 2
  moe.gshard_top2.second_expert_policy = "random"
  # A group = one position of group_size sequences: causal (second choices rank after later
  # tokens' first choices, which would leak the future within a sequence).
  moe.group_layout = "position"
  if preset == "tiny":
    # Groups of the 16 tokens at one position of the batch (C = 2 * ceil(16/8) * 1.25 = 5).
    moe.group_size = 16
  else:
    # GShard's decoder stack dimensions (d_model 1024, 16 heads, d_ff 8192, ReLU) at 12 layers
    # with 128 experts, top-2, capacity 2S/E (capacity_factor 1), aux loss 1e-2, no z-loss
    # (it came with ST-MoE). S = 256 tokens compete for C = 4 slots.
    m.d_model, m.num_heads, m.d_ff, m.activation = 1024, 16, 8192, "relu"
    moe.capacity_factor = 1.0
    moe.group_size = 256
    moe.gshard_top2.router_z_loss_weight = 0.0
  return c
