"""Hash Layers: route each token by a fixed function of its input token id.

Roller, Sukhbaatar, Szlam, Weston, "Hash Layers For Large Sparse Models", NeurIPS 2021,
arXiv:2106.04426 (reference code: ParlAI projects/params_vs_compute/hash_ladder).

Token s of a group goes to expert table[id_s], where id_s is the ORIGINAL input token id at
position s (not a function of the hidden state) and table is an int32[V] lookup built once
before training. There is no router parameter, no gate value (the expert output has weight 1)
and no auxiliary loss; training and evaluation route identically.

Tables (`model.moe.hash.table`):
- 'random': expert = h(id) mod E with h a keyed 32-bit integer hash (lowbias32 of id + seed *
  golden ratio), a pure function of (id, E, seed): no stored table, any vocabulary, identical on
  every host. ParlAI draws a table with Python's `random` seeded 42 instead, so the maps differ;
  both are a uniform random expert per token id. `random_hash_table` is the same map as a
  numpy table.
- 'balanced': `balanced_hash_table`, greedy bin packing of unigram frequencies: visit token ids
  by decreasing count (ties: lower id first) and put each in the expert whose total count is
  smallest so far (ties: lowest expert id), so every expert gets about 1/E of the training
  TOKENS. The paper's exact greedy rule is unconfirmed; this is the documented choice. Tokens
  never seen (count 0) would otherwise all land in the one expert with the smallest total, so
  they are dealt round-robin over the experts in id order instead (a choice). The counts come
  from a file (`token_counts`: a .npy of one count per id, written from the run's tokenizer and
  training split by `python -m moejax.token_counts`); the table is built from it once, when the
  model is built, and kept in the model state as a `HashTable` variable (checkpointed, never
  trained). Ids at or beyond the file's length use the random hash.

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

import dataclasses
import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry

RANDOM_HASH_SEED = 42
TABLES = ("random", "balanced")
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive seeds over the key space


def hash_experts(token_ids, num_experts: int, seed: int = RANDOM_HASH_SEED, xp=jnp):
  """The random hash: lowbias32(id + seed * 0x9E3779B9) mod E, in uint32 arithmetic.

  Args:
    token_ids: int array of token ids >= 0 (numpy or jax, as `xp`).
    num_experts: E.
    seed: the key of the hash.
    xp: numpy or jax.numpy.

  Returns:
    int32 array of experts in [0, E), the shape of token_ids.
  """
  mask = 0xFFFFFFFF
  x = xp.asarray(token_ids).astype(xp.uint32) + xp.uint32((seed * _GOLDEN) & mask)
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * xp.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  return (x % xp.uint32(num_experts)).astype(xp.int32)


def random_hash_table(vocab_size: int, num_experts: int, seed: int = RANDOM_HASH_SEED):
  """A uniform random expert per token id.

  Args:
    vocab_size: V.
    num_experts: E.
    seed: the key of `hash_experts`; the table is a pure function of (V, E, seed).

  Returns:
    numpy int32[V] with values in [0, E): `hash_experts` of ids 0..V-1.
  """
  _check_sizes(vocab_size, num_experts)
  with np.errstate(over="ignore"):  # uint32 products wrap by design
    return hash_experts(np.arange(vocab_size), num_experts, seed, xp=np)


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
  token_ids_s: jax.Array,
  table_v: jax.Array | None,
  *,
  num_experts: int,
  seed: int = RANDOM_HASH_SEED,
) -> base.SparseRouting:
  """Hash routing of one group: token s goes to expert table_v[token_ids_s[s]] with weight 1.

  Args:
    token_ids_s: int[S] input token ids (>= 0) of the group's tokens.
    table_v: int[V] expert of every token id (e.g. `balanced_hash_table`), in [0, E); ids >= V
      (and every id when table_v is None) go to `hash_experts(id, E, seed)`.
    num_experts: E (static: it sizes the load metric).
    seed: the key of the random hash.

  Returns:
    SparseRouting with N = S pairs (pair s is token s), all valid, combine weight 1.
    aux_losses: none (the table is fixed: there is nothing to balance by gradient).
    metrics: expert_load float32[E], the fraction of the S tokens sent to each expert.
  """
  token_ids_s = token_ids_s.astype(jnp.int32)
  expert_s = hash_experts(token_ids_s, num_experts, seed)
  if table_v is not None:
    listed_s = token_ids_s < table_v.shape[0]
    from_table_s = jnp.take(table_v.astype(jnp.int32), token_ids_s, axis=0, mode="clip")
    expert_s = jnp.where(listed_s, from_table_s, expert_s)
  load_e = jnp.mean(jax.nn.one_hot(expert_s, num_experts, dtype=jnp.float32), axis=0)
  weight_s1 = jnp.ones((expert_s.shape[0], 1), jnp.float32)
  return base.rank_major_routing(
    expert_s[:, None], weight_s1, aux_losses={}, metrics={"expert_load": load_e}
  )


def _check_sizes(vocab_size: int, num_experts: int) -> None:
  if vocab_size < 1 or num_experts < 1:
    raise ValueError(f"need {vocab_size=} >= 1 and {num_experts=} >= 1")


class HashTable(nnx.Variable):
  """A fixed token-id -> expert table: model state (checkpointed), never trained."""


def load_token_counts(path: str) -> np.ndarray:
  """The counts file of `model.moe.hash.token_counts` (.npy, one count >= 0 per token id).

  Raises:
    errors.ConfigError: a missing, unreadable or malformed file (one line, with the fix).
  """
  where = f"model.moe.hash.token_counts={path!r}"
  fix = "write it with `python -m moejax.token_counts --config ... --workdir ... --out FILE`"
  file = epath.Path(path)
  if not file.exists():
    raise errors.ConfigError(f"{where}: no such file; {fix}")
  try:
    with file.open("rb") as f:
      counts = np.load(f, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise errors.ConfigError(f"{where}: not a .npy array ({e}); {fix}") from None
  if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.number):
    raise errors.ConfigError(
      f"{where}: need a 1-D array of counts, got {counts.dtype}{counts.shape}"
    )
  if np.any(counts < 0) or not np.all(np.isfinite(counts)):
    raise errors.ConfigError(f"{where}: counts must be finite and >= 0; {fix}")
  return counts


@dataclasses.dataclass(frozen=True)
class HashOptions(base.RouterOptions):
  """Options of the `hash` family (`model.moe.hash.*`).

  Attributes:
    table: 'random' (keyed hash of the id) or 'balanced' (greedy packing of `token_counts`).
    seed: the random hash's key (also for ids beyond a balanced table).
    token_counts: the .npy counts file a balanced table is built from ('' for random).
  """

  table: str = base.option("random", choices=TABLES)
  seed: int = base.option(RANDOM_HASH_SEED, ge=0)
  token_counts: str = ""

  def __post_init__(self):
    super().__post_init__()
    if self.table == "balanced" and not self.token_counts:
      raise ValueError(
        "token_counts='': table='balanced' needs a counts file; write one with "
        "`python -m moejax.token_counts` and pass its path"
      )


@registry.register("hash")
class HashRouter(base.TokenChoiceRouter):
  """Hash Layers: each token's expert is a fixed function of its input id (top_k = 1).

  Causal (a token's expert and its capacity slot depend on it and earlier tokens only) and
  decodable (nothing is cached). No parameters, no aux loss.
  """

  Options = HashOptions
  READS_TOKENS = True

  @classmethod
  def check(cls, options: HashOptions, moe: base.MoESettings) -> None:
    base.need_one_expert_per_token(
      "hash", moe, "sends each token to one expert (MultiHash is not implemented)"
    )
    if options.table == "balanced":
      load_token_counts(options.token_counts)

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: HashOptions, rngs: nnx.Rngs):
    """Builds the router; a balanced table is packed here from the counts file."""
    del d_model, rngs
    self.check(options, moe)
    self.num_experts = moe.num_experts
    self.top_k = 1
    self.options = options
    table_v = None
    if options.table == "balanced":
      table_v = balanced_hash_table(load_token_counts(options.token_counts), moe.num_experts)
    # Shape: [V]; replicated int32, model state (checkpointed), None for the random hash.
    self.table = None if table_v is None else HashTable(jnp.asarray(table_v), axes=(None,))

  def __call__(self, x_gsd, *, train: bool, rng=None, token_ids, sequence_ids):
    """Routes every group by its `token_ids` alone: N = S pairs (one per token, weight 1),
    training and evaluation alike, no aux losses."""
    del x_gsd, train, rng, sequence_ids
    table_v = None if self.table is None else jax.lax.stop_gradient(self.table[...])
    route = functools.partial(
      route_hash, table_v=table_v, num_experts=self.num_experts, seed=self.options.seed
    )
    return base.route_groups(route, token_ids)
