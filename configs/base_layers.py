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

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # Switch-Base trunk: 12 layers, d_model 768, 12 heads, d_ff 3072, MoE every other layer.
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "gelu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "base", 64, 1
  moe.capacity_factor, moe.eval_capacity_factor = 1.0, 4.0
  moe.group_layout, moe.group_size = "position", 256  # a group = one position of 256 sequences
  moe.assignment_iterations = 100  # cap on auction rounds and on cycle-cancelling steps
  moe.aux_loss_weights.load_balance_loss = 0.0  # not produced: balanced by construction
  moe.aux_loss_weights.router_z_loss = 0.0  # not produced
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000

  if preset == "tiny":
    # configs/switch_base.py:tiny sizes and schedule, with this router. The batch of 16
    # sequences gives groups of the 16 tokens at one position: 2 tokens per expert.
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    moe.num_experts = 8
    moe.group_size = 16  # must divide train.batch_size; a multiple of num_experts
    moe.eval_capacity_factor = 8.0  # = num_experts: C = S, greedy eval drops nothing
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(f"configs/base_layers.py: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c
