"""Pair order of token-choice routing: choice-rank-major, and batch-prioritized.

`base.rank_major_routing` builds the SparseRouting of token-choice routers from per-token choices
[S, K]: pair r*S + s is token s's (r+1)-th choice, so that under capacity pressure all first
choices precede all second choices.

Batch-prioritized routing: capacity goes first to the tokens the router is most sure about.

Riquelme, Puigcerver, Mustafa, Neumann, Jenatton, Pinto, Keysers, Houlsby, "Scaling Vision with
Sparse Mixture of Experts" (V-MoE), NeurIPS 2021, arXiv:2106.05974; the rule as implemented by
flaxformer's token-choice routers (`batch_prioritized_routing=True`).

Token-choice pairs come choice-rank-major (all first choices in token order, then all second
choices, ...), and the capacity dispatch keeps pairs in that order until an expert is full, so
by default a token's position decides which first choices survive. Batch-prioritized routing
sorts the TOKENS of the group by decreasing top-1 router probability (a stable sort: equal
priorities keep token order) and keeps the choice-rank-major layout in that sorted order:
pair r*S + j is the (r+1)-th choice of the j-th most confident token. All first choices still
precede all second choices; only the order of tokens within a rank changes. The kept pairs
equal flaxformer's for the same probabilities and capacity.

The priority is an argument: for softmax top-k it is max_e p_s,e (the un-renormalised top-1
probability, what flaxformer sorts by); other token-choice routers pass their own first gate.
Aux losses and metrics are unchanged (they do not depend on pair order).

Integration notes: an option of the token-choice routers applied to their `SparseRouting`
before dispatch; nothing else changes. It is NOT causal in the 'sequence' group layout (a later,
more confident token can take an earlier token's slot), so it belongs to encoders, the
'position' layout or evaluation; with dropless dispatch it changes nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.model.routers import base


def batch_prioritized(routing: base.SparseRouting, priority_s: jax.Array) -> base.SparseRouting:
  """Reorders the tokens within every choice rank by decreasing priority.

  Args:
    routing: one group's choice-rank-major token-choice routing, N = K*S pairs where pair
      r*S + s is token s's (r+1)-th choice (as `route_top_k` returns).
    priority_s: float[S] priority of each token (its top-1 router probability).

  Returns:
    The same pairs, permuted: pair r*S + j is the (r+1)-th choice of the token with the j-th
    largest priority (ties: lower token index first). Aux losses and metrics are unchanged.
  """
  (num_tokens,) = priority_s.shape
  if routing.num_pairs % num_tokens:
    raise ValueError(
      f"{routing.num_pairs} pairs are not choice-rank-major over {num_tokens} tokens"
    )
  num_ranks = routing.num_pairs // num_tokens
  order_s = jnp.argsort(-priority_s.astype(jnp.float32), stable=True)
  # Shape: [K, S] -> [N], rank-major over the sorted tokens.
  perm_n = (jnp.arange(num_ranks)[:, None] * num_tokens + order_s[None, :]).reshape(-1)
  return dataclasses.replace(
    routing,
    token_index=routing.token_index[perm_n],
    expert_index=routing.expert_index[perm_n],
    combine_weight=routing.combine_weight[perm_n],
    valid=routing.valid[perm_n],
  )
