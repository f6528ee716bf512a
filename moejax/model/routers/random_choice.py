"""THOR: stochastic experts (a uniformly random expert per input) with consistency regularisation.

Zuo, Liu, Jiao, Kim, Hassan, Zhang, Zhao, Gao, "Taming Sparsely Activated Transformer with
Stochastic Experts", ICLR 2022, arXiv:2110.04260 (reference code:
microsoft/Stochastic-Mixture-of-Experts). The module is named random_choice so that it does not
shadow Python's `random`.

There is no router, gate value or aux loss: each expert layer draws one expert uniformly from
{0..E-1} and applies it with weight 1. The training objective runs the model TWICE on the same
batch (independent draws per layer and per pass, different dropout masks) and adds a consistency
term between the two output distributions:
  L = CE(p1, y) + CE(p2, y) + alpha * (1/2) (KL(p1 || p2) + KL(p2 || p1)),
per-token means over non-pad targets, gradient through both passes; alpha = 1.0 (code default;
the IWSLT'14 De-En script uses 5.0 with E = 2). `symmetric_kl` is that last term.

Draw levels (`route_random(level=...)`):
- 'token': every token draws its own expert (the caller splits the key over groups).
- 'sequence': one draw per sequence (the paper's "for each input" and the eval script's sentence
  level). The draw of sequence b uses fold_in(key, b), so tokens of one sequence agree even when
  they sit in different routing groups (group_layout 'position'), provided every group receives
  the same key and the tokens' sequence ids.
- 'batch': one draw for everything that receives the same key (the training code's choice: one
  draw per layer per pass shared by the batch).
The default is 'sequence'; which level the paper's reported numbers use is unconfirmed. At
evaluation THOR still draws at random: fix the key and report mean and std over a few seeds.

Integration notes: the train step must run two forward passes with keys fold_in(step, layer,
pass), sum the two cross-entropies and add alpha * symmetric_kl of the two passes' logits (this
needs train-step support: it is not an aux loss of one forward pass). For 'sequence' and 'batch'
levels one expert receives a whole group, so capacity dispatch needs C = S; cheaper is to gather
the drawn expert's weights (lax.dynamic_index_in_dim for 'batch', a [B, D, F] gather for
'sequence'). The draw depends on no token, so the router is causal in the 'sequence' layout, and
at decode time each new token needs only the key and its sequence id (no cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model.routers import base
from moejax.ops.aux_losses import symmetric_kl  # noqa: F401 - THOR's consistency term

LEVELS = ("token", "sequence", "batch")
CONSISTENCY_WEIGHT = 1.0  # alpha, the code default


def draw_experts(
  num_tokens: int,
  num_experts: int,
  rng: jax.Array,
  *,
  level: str = "sequence",
  sequence_ids_s: jax.Array | None = None,
) -> jax.Array:
  """The uniformly drawn expert of every token of a group.

  Args:
    num_tokens: S.
    num_experts: E.
    rng: PRNG key of this layer, pass and (for 'token') group.
    level: 'token', 'sequence' or 'batch' (see the module docstring).
    sequence_ids_s: int[S] sequence index of each token, used by 'sequence'; None means the
      group is one sequence.

  Returns:
    int32[S] experts in [0, E).
  """
  if level not in LEVELS:
    raise ValueError(f"unknown THOR draw {level=}; use one of {LEVELS}")
  if num_tokens < 1 or num_experts < 1:
    raise ValueError(f"need {num_tokens=} >= 1 and {num_experts=} >= 1")
  if level == "token":
    return jax.random.randint(rng, (num_tokens,), 0, num_experts, dtype=jnp.int32)
  if level == "batch" or sequence_ids_s is None:
    return jnp.full((num_tokens,), jax.random.randint(rng, (), 0, num_experts, dtype=jnp.int32))
  if sequence_ids_s.shape != (num_tokens,):
    raise ValueError(f"sequence_ids_s has shape {sequence_ids_s.shape}, need ({num_tokens},)")
  draw = lambda seq: jax.random.randint(jax.random.fold_in(rng, seq), (), 0, num_experts)
  return jax.vmap(draw)(sequence_ids_s.astype(jnp.int32)).astype(jnp.int32)


def route_random(
  num_tokens: int,
  num_experts: int,
  rng: jax.Array,
  *,
  level: str = "sequence",
  sequence_ids_s: jax.Array | None = None,
) -> base.SparseRouting:
  """THOR routing of one group: one uniformly random expert per token, weight 1.

  Args: as `draw_experts`.

  Returns:
    SparseRouting with N = S pairs (pair s is token s), all valid, combine weight 1.
    aux_losses: none. metrics: expert_load float32[E] (fraction of the S tokens per expert).
  """
  expert_s = draw_experts(num_tokens, num_experts, rng, level=level, sequence_ids_s=sequence_ids_s)
  load_e = jnp.mean(jax.nn.one_hot(expert_s, num_experts, dtype=jnp.float32), axis=0)
  weight_s1 = jnp.ones((num_tokens, 1), jnp.float32)
  return base.rank_major_routing(
    expert_s[:, None], weight_s1, aux_losses={}, metrics={"expert_load": load_e}
  )
