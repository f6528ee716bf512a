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

Integration (`ThorRouter`, registered as `random`): the train step runs two forward passes
(CONSISTENCY_PASSES = 2, keys fold_in(step key, pass) then the layer index), sums the two
cross-entropies and adds `consistency_loss_weight` * symmetric_kl of the two passes' logits. The
draw depends on no token and nothing is dropped (capacity C = S: one expert may receive a whole
group; the dropless dispatch computes exactly one expert per token), so the router is causal in
the 'sequence' layout.

Evaluation (`eval_choice`, the documented choice): 'random' (default, as the paper) draws one
expert per sequence and layer from a key fixed at initialisation (`EvalKey`, model state), so
evaluation is reproducible and KV-cache decoding (each new token sees only its sequence id)
routes exactly as a full forward pass; 'ensemble' gives every expert weight 1/E (the mean of
the E experts' outputs; E times the compute).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.routers import base, registry
from moejax.ops.aux_losses import symmetric_kl  # noqa: F401 - THOR's consistency term

LEVELS = ("token", "sequence", "batch")
EVAL_CHOICES = ("random", "ensemble")
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


def route_random(num_tokens: int, num_experts: int, rng: jax.Array, **draw) -> base.SparseRouting:
  """THOR routing of one group: one uniformly random expert per token, weight 1.

  Args: as `draw_experts` (`draw`: its keywords `level` and `sequence_ids_s`).

  Returns:
    SparseRouting with N = S pairs (pair s is token s), all valid, combine weight 1.
    aux_losses: none. metrics: expert_load float32[E] (fraction of the S tokens per expert).
  """
  expert_s = draw_experts(num_tokens, num_experts, rng, **draw)
  load_e = jnp.mean(jax.nn.one_hot(expert_s, num_experts, dtype=jnp.float32), axis=0)
  weight_s1 = jnp.ones((num_tokens, 1), jnp.float32)
  return base.rank_major_routing(
    expert_s[:, None], weight_s1, aux_losses={}, metrics={"expert_load": load_e}
  )


def route_ensemble(num_tokens: int, num_experts: int) -> base.SparseRouting:
  """Every token to every expert with weight 1/E (THOR's deterministic evaluation option).

  Returns:
    SparseRouting with N = S*E pairs, pair r*S + s = (token s, expert r), weight 1/E.
    metrics: expert_load float32[E] (uniform).
  """
  expert_se = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  weight_se = jnp.full((num_tokens, num_experts), 1.0 / num_experts, jnp.float32)
  load_e = jnp.full((num_experts,), 1.0 / num_experts, jnp.float32)
  return base.rank_major_routing(
    expert_se, weight_se, aux_losses={}, metrics={"expert_load": load_e}
  )


class EvalKey(nnx.Variable):
  """The fixed PRNG key data of THOR's random evaluation draws (model state, never trained)."""


@dataclasses.dataclass(frozen=True)
class ThorOptions(base.RouterOptions):
  """Options of the `random` family (`model.moe.random.*`, THOR).

  Attributes:
    level: training draws per 'token', per 'sequence' (default) or one per 'batch'.
    eval_choice: 'random' (one fixed-key draw per sequence) or 'ensemble' (all experts, 1/E).
    consistency_loss_weight: alpha of the symmetric KL between the two passes (code: 1.0).
  """

  level: str = base.option("sequence", choices=LEVELS)
  eval_choice: str = base.option("random", choices=EVAL_CHOICES)
  consistency_loss_weight: float = base.option(CONSISTENCY_WEIGHT, ge=0)


@registry.register("random", aliases=("thor",))
class ThorRouter(base.Router):
  """THOR: a uniformly random expert per token (weight 1), two passes with consistency.

  Causal and decodable: draws depend only on keys and sequence ids; capacity C = S drops nothing.
  """

  Options = ThorOptions
  READS_TOKENS = True
  CONSISTENCY_PASSES = 2

  @classmethod
  def causal_in_sequence(cls, options, moe: base.MoESettings) -> bool:
    del options, moe
    return True

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: ThorOptions, rngs: nnx.Rngs):
    """Builds the router: no parameters, only the fixed evaluation key (from `rngs.params`)."""
    del d_model
    self.num_experts = moe.num_experts
    self.options = options
    self.eval_key = EvalKey(jax.random.key_data(rngs.params()), axes=(None,))

  def capacity(self, num_tokens: int, capacity_factor: float) -> int:
    """C = S: a random draw may send a whole group to one expert, and THOR drops nothing."""
    del capacity_factor
    return num_tokens

  def __call__(self, x_gsd, *, train: bool, rng=None, token_ids, sequence_ids):
    """Routes every group from its shape and `sequence_ids` (N = S pairs, S*E for the ensemble,
    no aux losses): draws with `rng` at the configured level to train, else the evaluation
    choice (fixed-key per-sequence draws or the ensemble)."""
    del token_ids
    num_tokens = x_gsd.shape[1]
    draw = functools.partial(route_random, num_tokens, self.num_experts)
    if not train:
      if self.options.eval_choice == "ensemble":
        ensemble = lambda ids_s: route_ensemble(num_tokens, self.num_experts)
        return base.route_groups(ensemble, sequence_ids)
      key = jax.random.wrap_key_data(jax.lax.stop_gradient(self.eval_key[...]))
      route = lambda ids_s: draw(key, level="sequence", sequence_ids_s=ids_s)
      return base.route_groups(route, sequence_ids)
    rng = base.need_rng(rng, "the random (THOR) router")
    if self.options.level == "token":
      return base.route_groups(lambda ids_s, rng: draw(rng, level="token"), sequence_ids, rng=rng)
    # 'sequence' and 'batch': every group draws from the same key (a sequence spans groups).
    route = lambda ids_s: draw(rng, level=self.options.level, sequence_ids_s=ids_s)
    return base.route_groups(route, sequence_ids)
