"""Balanced linear assignment of S tokens to E experts, S/E tokens each (pure JAX, jittable).

Solves   max_pi  sum_s scores[s, pi(s)]   subject to   |{s : pi(s) = e}| = S/E for every e,
the assignment problem of BASE layers (Lewis et al. 2021), in three stages, all with static
shapes inside `lax` loops:

1. Auction (Bertsekas 1988) on the transportation form, with epsilon scaling. Expert e owns
   Q = S/E identical slots, each with a price; p_e is the lowest price of e's slots. Every round,
   each unassigned token s bids for its best expert e1 = argmax_e (a[s, e] - p_e), offering
   a[s, e1] - v2 + eps, where v2 is its best value a[s, e] - p_e over the other experts. All bids
   are made at once (Jacobi); each expert keeps the Q highest offers among its slot prices and the
   new bids (ties keep the current holder); tokens it no longer keeps bid again. A finished phase
   leaves every token with a[s, pi(s)] - p_pi(s) >= max_e (a[s, e] - p_e) - eps, so its total is
   within S * eps of the optimum. Phases use eps = EPS_START, / EPS_FACTOR, ... EPS_FINAL (units
   of the score range); each restarts every token from the previous phase's prices and gets an
   equal share of the rounds left. The prices start from a few log-domain Sinkhorn steps (the
   entropic dual at decreasing temperatures), which skips most of the coarse phases' work.
2. Repair, so quotas hold exactly whatever happened: the last phase's partial assignment is
   completed greedily (unassigned tokens propose to their best expert with a free slot, each
   expert accepts its best proposers; every round places all proposers or fills an expert, so at
   most E + 1 rounds); an earlier phase's complete assignment is used instead if its total is
   higher.
3. Negative-cycle cancelling, which makes the result exact. Moving token t from expert i to j
   costs a[t, i] - a[t, j]; the cheapest such move is an edge i -> j of weight W[i, j] on the E
   experts. Moves around a cycle keep every load; a balanced assignment is optimal iff no cycle
   has negative weight (cycle optimality of min-cost flow). Each step finds one by Bellman-Ford on
   the E x E graph (O(E^3)) and applies it, strictly raising the total. It stops when none is
   left: the assignment is then optimal (up to CYCLE_TOL of the score range per cycle) and
   `optimal` is True.

Design choices:
- Scores are shifted per token (a[s] - max_e a[s, e]) and divided by their largest range: neither
  changes the optimal assignment (every token is assigned once), and they make the tolerances
  scale free. Float32; no gradient flows.
- The auction alone is fast on tie-free scores but slow on duplicated tokens (identical bidders
  start price wars; in position-grouped routing, equal tokens at early positions are common);
  cycle cancelling needs few steps from a near-optimal start, whatever the duplicates. Each
  complements the other: 100 rounds + at most a few tens of cancellations are exact on every
  problem measured.
- `num_iterations` caps both the auction rounds and the cancelling steps; the result is balanced
  and at least as good as the greedy repair even at 0.
- Prices live on slots, not experts, because one Jacobi round may fill several slots of an expert
  at different prices; the optimality argument only needs each expert's lowest price.
- fairseq's BASE solver (eps = range/50, ~100 rounds, approximate greedy finish) inspired the
  capped auction plus finish; here eps is scaled down and the finish is exact.

Optimality and time measurements: docs/PERFORMANCE.md (BASE solver).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.ops import routing

# Auction epsilon schedule, in units of the (per-token shifted) score range.
EPS_START = 3e-3
EPS_FACTOR = 8.0
EPS_FINAL = 1e-5
# Sinkhorn warm start of the prices: SINKHORN_STEPS steps at each temperature.
SINKHORN_TAUS = (0.1, 0.03, 0.01, 0.003)
SINKHORN_STEPS = 3
# A cycle must improve the total by more than this (units of the score range) to be applied.
CYCLE_TOL = 1e-6


def _one_hot_rows(expert_s: jax.Array, num_experts: int) -> jax.Array:
  """bool[S, E]: row s is True at column expert_s[s] (nowhere for -1)."""
  return expert_s[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None, :]


def _loads(expert_s: jax.Array, num_experts: int) -> jax.Array:
  return jnp.sum(_one_hot_rows(expert_s, num_experts), axis=0, dtype=jnp.int32)


def _total(a_se: jax.Array, expert_s: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(_one_hot_rows(expert_s, a_se.shape[1]), a_se, 0.0))


def _holders_to_experts(holder_eq: jax.Array, num_tokens: int) -> jax.Array:
  """Slot holders int32[E, Q] (token id, -1 for an empty slot) -> int32[S] expert, -1 if none."""
  num_experts, _ = holder_eq.shape
  expert_eq = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None], holder_eq.shape)
  target = jnp.where(holder_eq >= 0, holder_eq, num_tokens).reshape(-1)
  expert_s = jnp.full((num_tokens,), -1, jnp.int32)
  return expert_s.at[target].set(expert_eq.reshape(-1), mode="drop")


def _sinkhorn_prices(a_se: jax.Array, quota: int) -> jax.Array:
  """Expert prices float32[E] from log-domain Sinkhorn on exp((a[s, e] - f_s - p_e) / tau) with
  row sums 1 and column sums Q, alternating exact updates of f and p, tau decreasing."""
  price_e = jnp.zeros((a_se.shape[1],), jnp.float32)
  for tau in SINKHORN_TAUS:
    for _ in range(SINKHORN_STEPS):
      f_s = tau * jax.nn.logsumexp((a_se - price_e[None, :]) / tau, axis=1)
      price_e = tau * jax.nn.logsumexp((a_se - f_s[:, None]) / tau, axis=0) - tau * math.log(quota)
  return price_e - jnp.min(price_e)


def _bid_round(a_se, price_eq, holder_eq, eps):
  """One Jacobi round: every unassigned token bids; every expert keeps its Q best offers."""
  num_tokens, num_experts = a_se.shape
  quota = price_eq.shape[1]
  bidding_s = _holders_to_experts(holder_eq, num_tokens) < 0
  value_se = a_se - jnp.min(price_eq, axis=1)[None, :]
  # Best and second-best value by max/argmax: on CPU, slicing lax.top_k's indices makes XLA
  # replace its fast TopK kernel by a full sort (much slower at S=1024, E=64).
  best_se = _one_hot_rows(jnp.argmax(value_se, axis=1).astype(jnp.int32), num_experts)
  v2_s = jnp.max(jnp.where(best_se, -jnp.inf, value_se), axis=1)
  bid_s = jnp.sum(jnp.where(best_se, a_se, 0.0), axis=1) - v2_s + eps
  # Candidates per expert [E, Q + S]: its Q slots, then the new bids (-inf where none).
  bids_es = jnp.where((best_se & bidding_s[:, None]).T, bid_s[None, :], -jnp.inf)
  cand_price = jnp.concatenate([price_eq, bids_es], axis=1)
  token_es = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[None, :], bids_es.shape)
  cand_holder = jnp.concatenate([holder_eq, token_es], axis=1)
  # top_k keeps the lower index among equal values: an equal offer never displaces a holder.
  price_eq, idx_eq = routing.top_k(cand_price, quota)
  return price_eq, jnp.take_along_axis(cand_holder, idx_eq, axis=1)


def _auction(a_se: jax.Array, quota: int, num_iterations: int) -> tuple[jax.Array, jax.Array]:
  """Epsilon-scaled auction. Returns (last phase's partial assignment int32[S], -1 where none;
  the last complete assignment of any phase, all -1 if none)."""
  num_tokens, num_experts = a_se.shape
  schedule = [EPS_START]
  while schedule[-1] > EPS_FINAL:
    schedule.append(max(schedule[-1] / EPS_FACTOR, EPS_FINAL))

  def run_phase(it, limit, price_eq, holder_eq, eps):
    def cond(state):
      it, _, holder_eq = state
      return (it < limit) & jnp.any(holder_eq < 0)

    def body(state):
      it, price_eq, holder_eq = state
      return (it + 1, *_bid_round(a_se, price_eq, holder_eq, eps))

    return jax.lax.while_loop(cond, body, (it, price_eq, holder_eq))

  it = jnp.zeros((), jnp.int32)
  price_e = _sinkhorn_prices(a_se, quota)
  complete_s = jnp.full((num_tokens,), -1, jnp.int32)
  for phase, eps in enumerate(schedule):
    # Every phase restarts all tokens from the previous prices and gets an equal share of the
    # rounds left (the last phase gets them all).
    limit = it + (num_iterations - it) // (len(schedule) - phase)
    price_eq = jnp.broadcast_to(price_e[:, None], (num_experts, quota))
    holder_eq = jnp.full((num_experts, quota), -1, jnp.int32)
    it, price_eq, holder_eq = run_phase(it, limit, price_eq, holder_eq, eps)
    partial_s = _holders_to_experts(holder_eq, num_tokens)
    complete_s = jnp.where(jnp.all(partial_s >= 0), partial_s, complete_s)
    price_e = jnp.min(price_eq, axis=1)
  return partial_s, complete_s


def _repair(a_se: jax.Array, expert_s: jax.Array, quota: int) -> jax.Array:
  """Completes a partial assignment (-1 = unassigned, at most Q per expert) greedily with exact
  quotas; assigned tokens keep their expert. Returns int32[S], exactly Q tokens per expert."""
  num_tokens, num_experts = a_se.shape
  position = jnp.arange(num_tokens, dtype=jnp.int32)

  def body(expert_s):
    free_e = quota - _loads(expert_s, num_experts)
    proposing_s = expert_s < 0
    want_s = jnp.argmax(jnp.where(free_e[None, :] > 0, a_se, -jnp.inf), axis=1).astype(jnp.int32)
    score_s = jnp.sum(jnp.where(_one_hot_rows(want_s, num_experts), a_se, 0.0), axis=1)
    # Sort proposals by (expert, score descending); non-proposers last (key E).
    key_s = jnp.where(proposing_s, want_s, num_experts)
    sorted_key, _, sorted_token = jax.lax.sort((key_s, -score_s, position), num_keys=2)
    count_e = _loads(key_s, num_experts)
    start_e = jnp.cumsum(count_e) - count_e
    # Rank of each proposal among its expert's proposals, back in token order.
    rank_sorted = position - start_e[jnp.minimum(sorted_key, num_experts - 1)]
    rank_s = jnp.zeros_like(position).at[sorted_token].set(rank_sorted)
    accept_s = proposing_s & (rank_s < free_e[want_s])
    return jnp.where(accept_s, want_s, expert_s)

  return jax.lax.while_loop(lambda e: jnp.any(e < 0), body, expert_s)


def _find_negative_cycle(w_ee: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bellman-Ford from a virtual source on the E-node graph with edge weights w_ee (inf = none).

  Returns:
    pred: int32[E] predecessor of each node on the best path found (-1 = the source).
    in_cycle: bool[E] nodes of a cycle of the predecessor graph (all False if none): reached by
      walking E predecessors back from a node that still improves after E relaxations.
  """
  num_nodes = w_ee.shape[0]

  def relax(_, state):
    dist, pred = state
    cand_ee = dist[:, None] + w_ee
    best = jnp.min(cand_ee, axis=0)
    better = best < dist - CYCLE_TOL
    best_i = jnp.argmin(cand_ee, axis=0).astype(jnp.int32)
    return jnp.where(better, best, dist), jnp.where(better, best_i, pred)

  init = (jnp.zeros((num_nodes,), jnp.float32), jnp.full((num_nodes,), -1, jnp.int32))
  dist, pred = jax.lax.fori_loop(0, num_nodes, relax, init)
  last_dist, pred = relax(0, (dist, pred))
  improving = last_dist < dist
  step = lambda v: pred[jnp.maximum(v, 0)]
  node = jax.lax.fori_loop(0, num_nodes, lambda _, v: step(v), jnp.argmax(improving))
  mark = lambda _, st: (st[0].at[st[1]].set(True), step(st[1]))
  in_cycle, _ = jax.lax.fori_loop(0, num_nodes, mark, (jnp.zeros((num_nodes,), bool), node))
  return pred, in_cycle & jnp.any(improving)


def _cancel_negative_cycles(
  a_se: jax.Array, expert_s: jax.Array, max_steps: int
) -> tuple[jax.Array, jax.Array]:
  """Applies negative cycles of token moves until none is left or `max_steps` were applied.

  Args:
    a_se: float32[S, E] scores.
    expert_s: int32[S] a complete balanced assignment.
    max_steps: cap on the cycles applied.

  Returns:
    expert_s: int32[S] balanced, total never lower than the input's.
    optimal: bool scalar, True when no negative cycle is left.
  """
  num_tokens, num_experts = a_se.shape
  experts = jnp.arange(num_experts, dtype=jnp.int32)

  def body(state):
    step, expert_s, _ = state
    own_s = jnp.sum(jnp.where(_one_hot_rows(expert_s, num_experts), a_se, 0.0), axis=1)
    cost_se = own_s[:, None] - a_se  # [S, E]: total lost by moving token s to expert e
    w_ee = jnp.full((num_experts, num_experts), jnp.inf).at[expert_s].min(cost_se)
    w_ee = jnp.where(experts[:, None] == experts[None, :], jnp.inf, w_ee)
    pred, in_cycle = _find_negative_cycle(w_ee)
    src_e = jnp.maximum(pred, 0)
    weight = jnp.sum(jnp.where(in_cycle, w_ee[src_e, experts], 0.0))
    # Into each cycle node j, the cheapest token of its predecessor pred[j].
    token_e = jnp.argmin(jnp.where(expert_s[:, None] == src_e[None, :], cost_se, jnp.inf), axis=0)
    moved_s = expert_s.at[jnp.where(in_cycle, token_e, num_tokens)].set(experts, mode="drop")
    # Guards against float noise: apply only a real improvement that keeps every load.
    apply = (weight < -CYCLE_TOL) & jnp.all(
      _loads(moved_s, num_experts) == num_tokens // num_experts
    )
    return step + 1, jnp.where(apply, moved_s, expert_s), apply

  def cond(state):
    step, _, improved = state
    return (step < max_steps) & improved

  _, expert_s, improved = jax.lax.while_loop(cond, body, (0, expert_s, jnp.asarray(True)))
  return expert_s, ~improved


def auction_assignment(scores_se: jax.Array, num_iterations: int) -> tuple[jax.Array, jax.Array]:
  """Balanced assignment, and whether it is certified optimal.

  Args:
    scores_se: float[S, E] token-expert scores; S must be a multiple of E. No gradient flows.
    num_iterations: cap on the auction's bidding rounds, and separately on the cycle-cancelling
      steps (>= 0; 0 gives the greedy repair alone).

  Returns:
    expert_s: int32[S] expert of each token; every expert appears exactly S/E times.
    optimal: bool scalar, True when no improving cycle of token moves is left, i.e. the total is
      maximal (up to float32 rounding).

  Raises:
    ValueError: if S is not a multiple of E, or num_iterations < 0.
  """
  num_tokens, num_experts = scores_se.shape
  if num_experts <= 0 or num_tokens % num_experts:
    raise ValueError(
      f"balanced assignment needs num_tokens % num_experts == 0, got {num_tokens=}, {num_experts=}"
    )
  if num_iterations < 0:
    raise ValueError(f"{num_iterations=} must be >= 0")
  quota = num_tokens // num_experts
  if num_experts == 1:
    return jnp.zeros((num_tokens,), jnp.int32), jnp.asarray(True)
  a_se = jax.lax.stop_gradient(scores_se).astype(jnp.float32)
  a_se = a_se - jnp.max(a_se, axis=1, keepdims=True)
  a_se = a_se / jnp.maximum(-jnp.min(a_se), jnp.finfo(jnp.float32).tiny)

  partial_s, complete_s = _auction(a_se, quota, num_iterations)
  expert_s = _repair(a_se, partial_s, quota)
  # Before any phase finished, complete_s is all -1 and is not used.
  use_complete = jnp.all(complete_s >= 0) & (_total(a_se, complete_s) > _total(a_se, expert_s))
  expert_s = jnp.where(use_complete, complete_s, expert_s)
  return _cancel_negative_cycles(a_se, expert_s, num_iterations)


def balanced_assignment(scores_se: jax.Array, num_iterations: int = 100) -> jax.Array:
  """The expert of every token, maximising the total score with exactly S/E tokens per expert.

  Args:
    scores_se: float[S, E] token-expert scores (e.g. affinities x . w); no gradient flows.
    num_iterations: cap on auction rounds and on cycle-cancelling steps (`auction_assignment`).

  Returns:
    int32[S] expert of each token; every expert appears exactly S/E times.

  Raises:
    ValueError: if S is not a multiple of E.
  """
  return auction_assignment(scores_se, num_iterations)[0]
