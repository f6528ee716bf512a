r"""ReMoE (Wang et al. 2024): ReLU routing with an adaptive L1 penalty, at Switch-Base size.

Gates are ReLU(x W_r): a token uses 0..E experts, and an L1 penalty whose coefficient lambda
(per MoE layer, model state) is multiplied by 1.2 whenever the layer is denser than the target
and divided otherwise steers the sparsity to 1 - k/E, here k = 1: on average the active compute
of top-1 Switch, once lambda has grown (the first steps are nearly dense: lambda starts at
1e-8). Per token the count varies (layer_*/active_experts_per_token, layer_*/l1_coef).

Choices: dropless dispatch, as the paper's scripts (a capacity sized for k overflows in the
dense first stage); max_experts = E in the tiny preset (exact: no token truncated) and 4 in the
full one (layer_*/truncated_fraction counts the cut tokens); router init std 0.01 (scripts).

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/remoe.py --workdir /tmp/remoe
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/remoe.py:tiny --workdir /tmp/remoe_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/remoe.py")
  moe = c.model.moe
  moe.router, moe.top_k, moe.dispatch = "relu", 1, "dropless"
  moe.relu.max_experts = moe.num_experts if preset == "tiny" else 4
  return c
