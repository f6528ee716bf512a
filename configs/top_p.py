r"""Dynamic top-p routing (Huang et al. 2024), decoder-only, at Switch-Base size.

Each token keeps its most probable experts until their probability mass passes P = 0.4 (at
least one, at most `max_experts` = 4), with the paper's entropy ("dynamic") loss sharpening the
router so fewer experts are needed, and the Switch balance loss on the kept sets. The number of
experts per token is decided by the router, so the active compute is NOT equal to switch_base:
near-uniform routing at the start keeps 4 experts per token; the metric
layer_*/experts_per_token shows where it settles.

Choices: the dropless dispatch (every kept expert computed; with max_experts > 1 and capacity,
a later token could take an earlier token's slot, which is not causal in the 'sequence'
layout). model.moe.top_k = 2 is the budget a capacity dispatch would be sized for (the paper's
top-2 comparison point); dropless does not use it. Loss weights: balance 1e-2, dynamic 1e-4
(recalled values: the paper's code releases no training losses).

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/top_p.py --workdir /tmp/top_p
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/top_p.py:tiny --workdir /tmp/top_p_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/top_p.py")
  moe = c.model.moe
  moe.router, moe.top_k, moe.dispatch = "top_p", 2, "dropless"
  gate = moe.top_p
  gate.threshold, gate.max_experts = 0.4, 4
  gate.load_balance_loss_weight, gate.dynamic_loss_weight = 1e-2, 1e-4
  return c
