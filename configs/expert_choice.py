r"""Expert-choice routing (Zhou et al. 2022), decoder-only, at Switch-Base size.

Each expert takes the c = ceil(capacity_factor * S / E) tokens of its routing group that want it
most (capacity factor 2: on average two experts per token, the paper's EC-CF2). The load is
balanced by construction, so there is no load-balancing loss; the router z-loss stays.

Expert choice is NOT causal within a sequence (whether token t is taken depends on how much the
later tokens of its group want the expert), so the routing groups are formed by POSITION
(`group_layout = "position"`: a group = the tokens at one position of `group_size` sequences,
which never holds a sequence's future; see docs/causality.md). Then S = group_size.

Kept from Switch-Base so the recipes compare: the trunk sizes, MoE every other layer, the
optimizer. The paper's 64-expert setting gives c = 2 * 256 / 64 = 8 tokens per expert per group.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/expert_choice.py --workdir /tmp/expert_choice
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/expert_choice.py:tiny --workdir /tmp/expert_choice_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/expert_choice.py")
  moe = c.model.moe
  moe.router = "expert_choice"  # top_k unused by this router
  # The same factor in training and evaluation: it sets the compute, not a drop tolerance.
  moe.capacity_factor, moe.eval_capacity_factor = 2.0, 2.0
  moe.group_layout = "position"  # a group = one position of group_size sequences
  moe.expert_choice.router_z_loss_weight = 1e-3  # no balance loss: balanced by construction
  if preset == "tiny":
    moe.group_size = 16  # the 16 tokens at one position: c = 2 * 16 / 8 = 4
  else:
    moe.num_experts, moe.group_size = 64, 256  # c = 2 * 256 / 64 = 8
  return c
