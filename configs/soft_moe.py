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

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/soft_moe.py")
  moe = c.model.moe
  moe.router = "soft_moe"  # top_k unused by this router
  moe.soft_moe.slots_per_expert = (
    2  # E * P slots = the group's tokens (128 * 2 = 256; tiny 8 * 2 = 16)
  )
  moe.group_layout = "position"  # a group = one position of group_size sequences
  moe.group_size = 16 if preset == "tiny" else 256
  return c
