r"""BASE layers (Lewis et al. 2021), decoder-only, at Switch-Base size.

Each expert has a learned centroid; in training the S tokens of a routing group are assigned
to experts by a balanced linear assignment (exactly S/E tokens each, maximal total affinity
x . w_e; an auction finished by negative-cycle cancelling, moejax/ops/balanced_assignment.py);
at evaluation each token takes its highest-affinity expert. The expert output is gated by
sigmoid(x . w_e), the only path by which the centroids learn. No auxiliary loss: balanced by
construction.

The assignment is NOT causal within a sequence (a token's expert depends on every token of its
group), so the routing groups are formed by POSITION (`group_layout = "position"`: a group = the
tokens at one position of `group_size` sequences; see docs/causality.md). Then S = group_size,
which must be a multiple of num_experts.

Capacity: training needs exactly S/E slots per expert (capacity_factor 1.0). Evaluation routes
greedily, so an expert may receive up to S tokens: the tiny preset sets eval_capacity_factor = E
(C = S, nothing dropped); the full recipe uses 4.0 (C = 16 of S = 256) because C = S would need
[groups, E, S, D] expert buffers (~50 GB per MoE layer at this size) and logs the eval
`dropped_fraction` instead.

Kept from Switch-Base so the recipes compare: the trunk sizes, MoE every other layer, the
optimizer; 64 experts and groups of 256 sequences, as the expert-choice recipe (4 tokens per
expert per group).

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/base_layers.py --workdir /tmp/base_layers
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/base_layers.py:tiny --workdir /tmp/base_layers_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/base_layers.py")
  moe = c.model.moe
  moe.router = "base"
  moe.capacity_factor = 1.0  # exactly S/E slots: the balanced assignment fills each exactly
  moe.base.num_iterations = 100  # cap on auction rounds and on cycle-cancelling steps
  moe.group_layout = "position"  # a group = one position of group_size sequences
  if preset == "tiny":
    moe.group_size = 16  # divides train.batch_size; a multiple of num_experts (2 per expert)
    moe.eval_capacity_factor = 8.0  # = num_experts: C = S, greedy eval drops nothing
  else:
    moe.num_experts, moe.group_size = 64, 256
    moe.eval_capacity_factor = 4.0  # C = S would need ~50 GB expert buffers per layer
  return c
