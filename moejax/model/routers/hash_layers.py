"""Hash Layers: route each token by a fixed function of its input token id.

Roller, Sukhbaatar, Szlam, Weston, "Hash Layers For Large Sparse Models", NeurIPS 2021,
arXiv:2106.04426 (reference code: ParlAI projects/params_vs_compute/hash_ladder).

Token s of a group goes to expert table[id_s], where id_s is the ORIGINAL input token id at
position s (not a function of the hidden state) and table is an int32[V] lookup built once
before training. There is no router parameter, no gate value (the expert output has weight 1)
and no auxiliary loss; training and evaluation route identically.

Tables (built on the host with numpy, stored as constants next to the checkpoint together with
the seed or the frequency counts they came from):
- `random_hash_table`: table[v] uniform in [0, E) from a fixed seed (ParlAI seeds Python's
  `random` with 42; here numpy's default generator, so the tables differ from ParlAI's).
- `balanced_hash_table`: greedy bin packing of unigram frequencies: visit token ids by
  decreasing count (ties: lower id first) and put each in the expert whose total count is
  smallest so far (ties: lowest expert id), so every expert gets about 1/E of the training
  TOKENS. The paper's exact greedy rule is unconfirmed; this is the documented choice.
  Tokens never seen (count 0) would otherwise all land in the one expert with the smallest
  total, so they are dealt round-robin over the experts in id order instead (a choice).

Not implemented: MultiHash (M hash functions, each expert's FFN cut into M slices along the
hidden axis), Clustered / Dispersed hashes (k-means of trained embeddings) and bigram or
position hashes. The paper recommends the Balanced and Random hashes of the current token.

Pitfall: BPE frequencies are Zipfian, so a Random table can give one expert a few times the
mean load in a batch, and a Balanced table balances only in corpus expectation: log the
per-expert load (metric `expert_load`) and the dropped fraction.

Integration notes: the MoE layer must receive the input token ids of its tokens (the decoder
input ids, grouped exactly like the hidden states) and hold the table as a non-parameter
constant (a new tokenizer invalidates it). The expert of a token depends only on that token, so
with dropless dispatch the layer is causal in the 'sequence' group layout; with capacity
dispatch and k=1 a token's slot depends only on earlier tokens, so it is causal too. At decode
time nothing is cached: the current token id picks the expert.
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model.routers import base

RANDOM_HASH_SEED = 42


def random_hash_table(vocab_size: int, num_experts: int, seed: int = RANDOM_HASH_SEED):
  """A uniform random expert per token id.

  Args:
    vocab_size: V.
    num_experts: E.
    seed: seed of numpy's default generator; the table is a pure function of (V, E, seed).

  Returns:
    numpy int32[V] with values in [0, E).
  """
  _check_sizes(vocab_size, num_experts)
  return np.random.default_rng(seed).integers(0, num_experts, size=vocab_size).astype(np.int32)


def balanced_hash_table(token_counts_v, num_experts: int):
  """Greedy bin packing of token frequencies into E experts of nearly equal total frequency.

  Args:
    token_counts_v: int or float [V] unigram counts of each token id on the training data
      (e.g. np.bincount(ids, minlength=V)); must be >= 0.
    num_experts: E.

  Returns:
    numpy int32[V] with values in [0, E): seen ids by decreasing count (ties: lower id first)
    each go to the expert with the smallest total so far (ties: lowest expert id); unseen ids
    (count 0) are dealt round-robin in id order.
  """
  counts_v = np.asarray(token_counts_v)
  if counts_v.ndim != 1:
    raise ValueError(f"token_counts_v must be one count per token id, got shape {counts_v.shape}")
  _check_sizes(counts_v.shape[0], num_experts)
  if np.any(counts_v < 0) or not np.all(np.isfinite(counts_v)):
    raise ValueError("token_counts_v must be finite counts >= 0; recount the training data")
  table_v = np.zeros(counts_v.shape[0], np.int32)
  # A stable sort of -count: decreasing count, lower id first among equal counts.
  order = np.argsort(-counts_v, kind="stable")
  seen = order[counts_v[order] > 0]
  unseen = np.sort(order[counts_v[order] == 0])
  # Min-heap of (total count, expert id): pops the least loaded expert, lowest id on ties.
  heap = [(0, e) for e in range(num_experts)]
  for token in seen.tolist():
    total, expert = heapq.heappop(heap)
    table_v[token] = expert
    heapq.heappush(heap, (total + counts_v[token].item(), expert))
  table_v[unseen] = np.arange(unseen.shape[0]) % num_experts
  return table_v


def route_hash(
  token_ids_s: jax.Array, table_v: jax.Array, *, num_experts: int
) -> base.SparseRouting:
  """Hash routing of one group: token s goes to expert table_v[token_ids_s[s]] with weight 1.

  Args:
    token_ids_s: int[S] input token ids of the group's tokens, in [0, V) (ids outside are
      clamped: the data pipeline checks ids against the vocabulary).
    table_v: int[V] expert of every token id (from `random_hash_table` or
      `balanced_hash_table`), in [0, E).
    num_experts: E (static: it sizes the load metric).

  Returns:
    SparseRouting with N = S pairs (pair s is token s), all valid, combine weight 1.
    aux_losses: none (the table is fixed: there is nothing to balance by gradient).
    metrics: expert_load float32[E], the fraction of the S tokens sent to each expert.
  """
  expert_s = jnp.take(table_v.astype(jnp.int32), token_ids_s.astype(jnp.int32), axis=0, mode="clip")
  load_e = jnp.mean(jax.nn.one_hot(expert_s, num_experts, dtype=jnp.float32), axis=0)
  weight_s1 = jnp.ones((expert_s.shape[0], 1), jnp.float32)
  return base.rank_major_routing(
    expert_s[:, None], weight_s1, aux_losses={}, metrics={"expert_load": load_e}
  )


def _check_sizes(vocab_size: int, num_experts: int) -> None:
  if vocab_size < 1 or num_experts < 1:
    raise ValueError(f"need {vocab_size=} >= 1 and {num_experts=} >= 1")
