r"""DeepSeekMoE (Dai et al. 2024) with DeepSeek-V3 aux-loss-free balancing, at Switch-Base size.

Fine-grained experts in DeepSeekMoE-16B's ratios: each FFN is split into 4 (d_expert = d_ff / 4),
64 routed experts of which 6 are active, plus 2 shared experts every token uses (built from
model.moe.num_shared_experts in model/transformer.py). Gate: DeepSeek-V3 sigmoid affinities, a
per-expert bias that only steers selection and moves by gamma = 1e-3 per step toward balance
(1e-2 in the short tiny preset), weights normalised over the chosen 6, and a tiny sequence-wise
balance loss (alpha 1e-4; the other aux losses are not produced by this router).

Choices (see moejax/model/routers/deepseek.py):
- group_layout 'position': with the capacity dispatch and k > 1 a later token's first choice can
  displace an earlier token's second choice, which leaks the future inside a sequence; grouping
  the tokens at one position of group_size sequences keeps the decoder causal. (The
  "sequence-wise" balance loss is then computed per such group.)
- capacity_factor 2.0 (eval 3.0): DeepSeek is dropless and the capacity dispatch is not, so the
  factor is generous; watch layer_*/dropped_fraction.
- Kept from Switch-Base so the two recipes compare: sizes, MoE every other layer (DeepSeekMoE
  uses every layer but the first), the optimizer. DeepSeek uses SwiGLU experts (full recipe here);
  the tiny preset keeps GELU like switch_base:tiny.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/deepseek_moe.py --workdir /tmp/deepseek_moe
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/deepseek_moe.py:tiny --workdir /tmp/deepseek_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/deepseek_moe.py")
  m, moe = c.model, c.model.moe
  moe.router = "deepseek"
  moe.d_expert = m.d_ff // 4  # fine-grained experts: 1/4 of an FFN
  gate = moe.deepseek
  gate.route_scale = 1.0
  gate.num_expert_groups, gate.top_expert_groups = 1, 1  # group-limited routing off (V3: 8, 4)
  moe.capacity_factor, moe.eval_capacity_factor = 2.0, 3.0  # generous: DeepSeek is dropless
  moe.group_layout = "position"  # k > 1 with capacity is not causal within a sequence
  gate.sequence_balance_loss_weight = 1e-4  # the only aux loss this router returns
  if preset == "tiny":
    # 16 experts of d_ff/4 = 128, top-4, 1 shared expert.
    moe.num_experts, moe.top_k, moe.num_shared_experts = 16, 4, 1
    moe.group_size = 16
    # V3's gamma 1e-3 is too slow for 600 steps at lr 2e-3 (docs/PERFORMANCE.md, DeepSeek tiny).
    gate.bias_update_rate = 1e-2
  else:
    # DeepSeekMoE-16B ratios: 64 routed experts (top-6) + 2 shared, SwiGLU.
    m.activation = "swiglu"
    moe.num_experts, moe.top_k, moe.num_shared_experts = 64, 6, 2
    moe.group_size = 256
    gate.bias_update_rate = 1e-3
  return c
