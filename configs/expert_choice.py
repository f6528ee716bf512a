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

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  # Switch-Base trunk: 12 layers, d_model 768, 12 heads, d_ff 3072, MoE every other layer.
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "gelu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "expert_choice", 64, 1  # top_k unused by this router
  # The same factor in training and evaluation: it sets the compute, not a drop tolerance.
  moe.capacity_factor, moe.eval_capacity_factor = 2.0, 2.0
  moe.group_layout, moe.group_size = "position", 256  # a group = one position of 256 sequences
  moe.aux_loss_weights.load_balance_loss = 0.0  # not produced: balanced by construction
  moe.aux_loss_weights.router_z_loss = 1e-3
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000

  if preset == "tiny":
    # configs/switch_base.py:tiny sizes and schedule, with this router. The batch of 16
    # sequences gives groups of the 16 tokens at one position: c = 2 * 16 / 8 = 4.
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    moe.num_experts = 8
    moe.group_size = 16  # must divide train.batch_size with group_layout 'position'
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(
      f"configs/expert_choice.py: unknown preset {preset!r}; known: '' (full), 'tiny'"
    )
  return c
