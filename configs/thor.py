r"""THOR (Zuo et al. 2022): stochastic experts with consistency regularisation, Switch-Base size.

No router: every MoE layer sends each sequence to one uniformly random expert (weight 1), drawn
again for every layer, step and pass. Each training step runs the model twice (different draws)
and adds alpha = 1 times the symmetric KL between the two passes' output distributions to the
two cross-entropies, so a step costs two forward and backward passes: twice switch_base's
compute per step (the benchmark compares at equal steps). Evaluation draws one expert per
sequence and layer from a key fixed at initialisation (the paper's inference is random; set
model.moe.random.eval_choice='ensemble' for the mean of all experts, E times the compute).

Choices: draws per sequence (`level`, the paper's "for each input"); dropless dispatch (exactly
the drawn expert runs; the capacity dispatch would reserve C = S slots per expert since a draw
may send a whole group to one expert).

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/thor.py --workdir /tmp/thor
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/thor.py:tiny --workdir /tmp/thor_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/thor.py")
  moe = c.model.moe
  moe.router, moe.top_k, moe.dispatch = "random", 1, "dropless"
  thor = moe.random
  thor.level, thor.eval_choice, thor.consistency_loss_weight = "sequence", "random", 1.0
  return c
