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

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/noisy_topk.py")
  m, moe = c.model, c.model.moe
  moe.router = "noisy_top_k"
  moe.noisy_top_k.noise_epsilon = 1e-2
  moe.group_layout = "position"  # k > 1 with capacity is not causal within a sequence
  # Importance and load losses at 1e-2 each (the family's defaults; the paper used 0.1 with LSTMs).
  moe.noisy_top_k.importance_loss_weight = moe.noisy_top_k.load_loss_weight = 1e-2
  if preset == "tiny":
    # k = 2: with k = 1 the single gate is always 1 and the gate kernel would learn from the load
    # loss only. Groups are the 16 tokens at one position (C = ceil(1.25 * 16 * 2 / 8) = 5).
    moe.top_k, moe.group_size = 2, 16
  else:
    # The paper's flat MoE gating at Switch-Base size: 64 ReLU experts, k = 4.
    m.activation = "relu"
    moe.num_experts, moe.top_k, moe.group_size = 64, 4, 256
  return c
