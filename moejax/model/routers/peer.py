"""PEER: a huge pool of single-neuron experts retrieved by product keys, several heads per token.

Xu Owen He, "Mixture of A Million Experts", 2024, arXiv:2407.04153. No official code was found;
the unofficial lucidrains/PEER-pytorch ("following Algorithm 1 in the paper") was read.

Expert i of a pool of E = R^2 is one neuron: e_i(x) = act(u_i . x) v_i with rows u_i, v_i of two
[E, D] tables. Each of H heads has a query q_h(x) = BN(x W_q)[h] (query batch norm over the
tokens of the batch) and retrieves the K experts with the largest q_h . key_i, where key_(a,b) =
[c_a ; c'_b] concatenates one row of each of two [R, Q/2] sub-key tables (product keys): the
exact top-K over all E keys lies among the K x K sums of the top-K scores of each half. Then
  f(x) = sum_h sum_{i in I_h(x)} softmax_K(scores_h)_i * act(u_i . x) v_i.
Cost per token: H*R*Q for the sub-key scores and 2*H*K*D for the experts; no [tokens, E] array.

Design choices (unconfirmed in the paper, so arguments):
- Sub-keys are per head ([H, R, Q/2] each); pass the same table broadcast to H for shared keys.
- Gates are the softmax over each head's K scores (Algorithm 1); activation GELU (lucidrains'
  default; the paper writes a generic sigma). Typical sizes E = 1024^2, K = 16, H = 8.
- Query batch norm (`query_batch_norm`): per query feature over all tokens of the call, biased
  variance, running averages with momentum 0.99 used at eval (flax's BatchNorm convention).
- No aux loss (none described); log `retrieval_usage` (fraction of the pool retrieved).

Legend: T tokens, D d_model, H heads, Q query width per head, J = Q/2 (one half), R sub-keys per
half, E = R^2 experts, K experts retrieved per head.

Integration (`PeerRouter`, COMPUTES_OUTPUT): the pool is the layer's ExpertBank built with
model.moe.d_expert = 1 (w_in [E, D, 1] holds the u_i, w_out [E, 1, D] the v_i, sharded on the
'expert' axis; its activation is sigma), so no other expert weights exist; the router owns W_q,
the sub-keys and the query norm. Retrieval and the expert products run over chunks of
`token_chunk` tokens (lax.map, rematerialised in the backward), so the largest buffers are the
[E, D] tables and their gradients (a scatter-add into dense [E, D]), never [tokens, E]. Query
batch norm takes its statistics per routing GROUP (a ghost batch norm; the paper normalises over
the batch): with group_layout 'position' a group is one position of several sequences, so
training stays causal; in the 'sequence' layout it sees later tokens of the group at training
(not causal: `query_norm='layer'`, a per-token LayerNorm, is). Evaluation and decoding use the
running statistics (eval mode), one token at a time, with no cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.model.routers import base, registry
from moejax.ops import routing

BN_MOMENTUM = 0.99
BN_EPS = 1e-5


def product_key_topk(
  query_thq: jax.Array, first_keys_hrj: jax.Array, second_keys_hrj: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array]:
  """Exact top-K of q . key over E = R^2 product keys, without a [T, E] score matrix.

  Args:
    query_thq: float[T, H, Q] queries; the first Q/2 features meet the first sub-keys.
    first_keys_hrj: float[H, R, Q/2] sub-keys c_a (expert (a, b) has index a*R + b).
    second_keys_hrj: float[H, R, Q/2] sub-keys c'_b.
    top_k: K <= R.

  Returns:
    scores_thk: float32[T, H, K] q . [c_a ; c'_b] of the retrieved experts, decreasing.
    index_thk: int32[T, H, K] their indices a*R + b in [0, R^2).
  """
  num_heads, num_rows, half = first_keys_hrj.shape
  if second_keys_hrj.shape != first_keys_hrj.shape or query_thq.shape[1:] != (num_heads, 2 * half):
    raise ValueError(
      f"need queries [T, H, Q] and two sub-key tables [H, R, Q/2]; got {query_thq.shape}, "
      f"{first_keys_hrj.shape}, {second_keys_hrj.shape}"
    )
  if not 1 <= top_k <= num_rows:
    raise ValueError(f"need 1 <= {top_k=} <= {num_rows} sub-keys per half")
  query_thq = query_thq.astype(jnp.float32)
  half_score = lambda q_thj, keys_hrj: jnp.einsum(
    "thj,hrj->thr", q_thj, keys_hrj.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  # Shape: [T, H, K] per half: the best K rows of each sub-key table.
  first_thk, first_idx = routing.top_k(half_score(query_thq[..., :half], first_keys_hrj), top_k)
  second_thk, second_idx = routing.top_k(half_score(query_thq[..., half:], second_keys_hrj), top_k)
  # Shape: [T, H, K*K] candidate sums and their expert indices.
  num_tokens = query_thq.shape[0]
  cand_shape = (num_tokens, num_heads, top_k * top_k)
  cand_scores = (first_thk[..., :, None] + second_thk[..., None, :]).reshape(cand_shape)
  cand_index = (first_idx[..., :, None] * num_rows + second_idx[..., None, :]).reshape(cand_shape)
  scores_thk, pos_thk = routing.top_k(cand_scores, top_k)
  index_thk = jnp.take_along_axis(cand_index, pos_thk, axis=-1)
  return scores_thk, index_thk.astype(jnp.int32)


def peer_forward(
  x_td: jax.Array,
  query_thq: jax.Array,
  first_keys_hrj: jax.Array,
  second_keys_hrj: jax.Array,
  down_ed: jax.Array,
  up_ed: jax.Array,
  *,
  top_k: int,
  activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
) -> tuple[jax.Array, jax.Array]:
  """The PEER layer output: H heads, each summing K retrieved single-neuron experts.

  Args:
    x_td: [T, D] tokens; the expert products run in this dtype.
    query_thq: float[T, H, Q] (normalised) queries.
    first_keys_hrj, second_keys_hrj: float[H, R, Q/2] sub-keys (see `product_key_topk`).
    down_ed: [E, D] u_i, E = R^2.
    up_ed: [E, D] v_i.
    top_k: K experts per head.
    activation: sigma of act(u_i . x).

  Returns:
    y_td: [T, D] in x's dtype.
    index_thk: int32[T, H, K] the retrieved experts (for usage metrics).
  """
  num_rows = first_keys_hrj.shape[1]
  if down_ed.shape != up_ed.shape or down_ed.shape != (num_rows * num_rows, x_td.shape[-1]):
    raise ValueError(
      f"need expert tables [R^2={num_rows**2}, D={x_td.shape[-1]}]; got {down_ed.shape}, "
      f"{up_ed.shape}"
    )
  scores_thk, index_thk = product_key_topk(query_thq, first_keys_hrj, second_keys_hrj, top_k)
  dtype = x_td.dtype
  gate_thk = jax.nn.softmax(scores_thk, axis=-1).astype(dtype)
  # Shape: [T, H, K, D] each: only the retrieved rows of the pool.
  down_thkd = jnp.take(down_ed.astype(dtype), index_thk, axis=0)
  up_thkd = jnp.take(up_ed.astype(dtype), index_thk, axis=0)
  hidden_thk = activation(jnp.einsum("td,thkd->thk", x_td, down_thkd)) * gate_thk
  return jnp.einsum("thk,thkd->td", hidden_thk, up_thkd), index_thk


def query_batch_norm(
  query_thq: jax.Array,
  scale_hq: jax.Array,
  bias_hq: jax.Array,
  running_mean_hq: jax.Array,
  running_var_hq: jax.Array,
  *,
  train: bool,
  mask_t: jax.Array | None = None,
  momentum: float = BN_MOMENTUM,
  eps: float = BN_EPS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm of the queries over the token axis, with running statistics for eval.

  Args:
    query_thq: float[T, H, Q] raw queries x W_q.
    scale_hq, bias_hq: float[H, Q] learned affine.
    running_mean_hq, running_var_hq: float32[H, Q] running statistics.
    train: True normalises by this call's statistics and updates the running ones; False
      normalises by the running statistics and returns them unchanged.
    mask_t: bool [T] tokens that count in the statistics (False: padding); None counts all.
    momentum: running = momentum * running + (1 - momentum) * batch.
    eps: added to the variance.

  Returns:
    normed_thq: float32[T, H, Q]; new_mean_hq, new_var_hq: float32[H, Q].
  """
  query_thq = query_thq.astype(jnp.float32)
  if train:
    weight_t = jnp.ones(query_thq.shape[:1]) if mask_t is None else mask_t.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight_t), 1.0)
    mean_hq = jnp.einsum("t,thq->hq", weight_t, query_thq) / count
    var_hq = jnp.einsum("t,thq->hq", weight_t, jnp.square(query_thq - mean_hq)) / count
    new_mean = momentum * running_mean_hq + (1.0 - momentum) * mean_hq
    new_var = momentum * running_var_hq + (1.0 - momentum) * var_hq
  else:
    mean_hq, var_hq = running_mean_hq, running_var_hq
    new_mean, new_var = running_mean_hq, running_var_hq
  normed_thq = (query_thq - mean_hq) * jax.lax.rsqrt(var_hq + eps)
  return normed_thq * scale_hq + bias_hq, new_mean, new_var


def retrieval_usage(index_thk: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of the E experts retrieved at least once by any token and head (a metric)."""
  hit_e = jnp.zeros((num_experts,), jnp.float32).at[index_thk.reshape(-1)].set(1.0)
  return jnp.mean(hit_e)


def chunked_peer_forward(
  x_td, query_thq, first_keys, second_keys, down_ed, up_ed, *, top_k, activation, token_chunk: int
):
  """`peer_forward` over chunks of `token_chunk` tokens (lax.map, rematerialised).

  Returns:
    y_td: [T, D] in x's dtype; index_thk: int32[T, H, K].
  """
  num_tokens, dim = x_td.shape
  chunk = min(token_chunk, num_tokens)
  num_chunks = -(-num_tokens // chunk)
  pad = num_chunks * chunk - num_tokens
  to_chunks = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
    num_chunks, chunk, *a.shape[1:]
  )

  @jax.checkpoint
  def one_chunk(args):
    x_cd, q_chq = args
    return peer_forward(
      x_cd, q_chq, first_keys, second_keys, down_ed, up_ed, top_k=top_k, activation=activation
    )

  y_ncd, index_nchk = jax.lax.map(one_chunk, (to_chunks(x_td), to_chunks(query_thq)))
  y_td = y_ncd.reshape(-1, dim)[:num_tokens]
  return y_td, index_nchk.reshape(-1, *index_nchk.shape[2:])[:num_tokens]


def layer_norm_queries(query_thq, scale_hq, bias_hq, eps: float = BN_EPS):
  """Per-token LayerNorm of each head's query (the batch-independent, causal option)."""
  query_thq = query_thq.astype(jnp.float32)
  mean = jnp.mean(query_thq, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(query_thq - mean), axis=-1, keepdims=True)
  return (query_thq - mean) * jax.lax.rsqrt(var + eps) * scale_hq + bias_hq


class QueryNormStats(nnx.Variable):
  """Running mean / variance of PEER's query batch norm: updated by a rule, not by gradients."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QueryRouting:
  """PEER's routing output: the normalised queries (retrieval runs in `compute`).

  Attributes:
    query_gshq: float32[G, S, H, Q].
  """

  query_gshq: jax.Array
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


QUERY_NORMS = ("batch", "layer")


@dataclasses.dataclass(frozen=True)
class PeerOptions(base.RouterOptions):
  """Options of the `peer` family (`model.moe.peer.*`).

  model.moe.num_experts is the pool size E (a square R^2), model.moe.top_k the experts K each
  head retrieves (K <= R) and model.moe.d_expert must be 1 (single-neuron experts).

  Attributes:
    num_heads: H retrieval heads (8).
    query_dim: Q, the query width per head (even; each sub-key has Q/2).
    query_norm: 'batch' (the paper; statistics per routing group) or 'layer' (per token).
    bn_momentum: running = momentum * running + (1 - momentum) * batch statistics.
    init_std: standard deviation of the query projection and sub-key inits.
    token_chunk: tokens per chunk of retrieval + expert products (memory bound).
  """

  num_heads: int = base.option(8, ge=1)
  query_dim: int = 64
  query_norm: str = base.option("batch", choices=QUERY_NORMS)
  bn_momentum: float = base.option(BN_MOMENTUM, ge=0, lt=1)
  init_std: float = 0.02
  token_chunk: int = base.option(512, ge=1)

  def __post_init__(self):
    super().__post_init__()
    if self.query_dim < 2 or self.query_dim % 2:
      raise ValueError(f"query_dim={self.query_dim}: must be even and >= 2 (two halves)")


@registry.register("peer")
class PeerRouter(base.Router):
  """PEER: product-key retrieval of single-neuron experts, H heads of K experts per token."""

  Options = PeerOptions
  COMPUTES_OUTPUT = True

  @classmethod
  def check(cls, options: PeerOptions, moe: base.MoESettings) -> None:
    rows = math.isqrt(moe.num_experts)
    if rows * rows != moe.num_experts:
      raise errors.ConfigError(
        f"model.moe.num_experts={moe.num_experts}: the peer router's product keys need a square "
        f"number of experts, e.g. {rows * rows} or {(rows + 1) ** 2}"
      )
    if moe.top_k > rows:
      raise errors.ConfigError(
        f"model.moe.top_k={moe.top_k}: each peer head retrieves at most sqrt(num_experts)="
        f"{rows} experts; use top_k <= {rows}"
      )
    if moe.d_expert != 1:
      raise errors.ConfigError(
        f"model.moe.d_expert={moe.d_expert}: peer experts are single neurons; set "
        "model.moe.d_expert=1 (the expert bank then holds the pool's [E, D] tables)"
      )

  @classmethod
  def causal_in_sequence(cls, options: PeerOptions, moe: base.MoESettings) -> bool:
    """Per-token norm: causal; query batch norm sees the whole group at training."""
    return options.query_norm == "layer"

  @classmethod
  def upcycle_refusal(cls, options, noise: float) -> str | None:
    return "peer experts are single neurons retrieved by keys: a dense MLP cannot be copied in"

  def __init__(self, *, d_model: int, moe: base.MoESettings, options: PeerOptions, rngs: nnx.Rngs):
    """Builds W_q [D, H*Q], sub-keys [H, R, Q/2] x 2, the query norm and its running stats."""
    self.check(options, moe)
    self.options = options
    self.num_experts, self.top_k = moe.num_experts, moe.top_k
    heads, query, rows = options.num_heads, options.query_dim, math.isqrt(moe.num_experts)
    init = jax.nn.initializers.normal(stddev=options.init_std)
    self.w_query = nnx.Param(init(rngs.params(), (d_model, heads * query)), axes=("embed", None))
    keys = lambda: nnx.Param(init(rngs.params(), (heads, rows, query // 2)), axes=(None,) * 3)
    self.first_keys, self.second_keys = keys(), keys()
    self.norm_scale = nnx.Param(jnp.ones((heads, query), jnp.float32), axes=(None, None))
    self.norm_bias = nnx.Param(jnp.zeros((heads, query), jnp.float32), axes=(None, None))
    self.running_mean = QueryNormStats(jnp.zeros((heads, query), jnp.float32), axes=(None, None))
    self.running_var = QueryNormStats(jnp.ones((heads, query), jnp.float32), axes=(None, None))

  def __call__(self, x_gsd, *, train: bool, rng=None) -> QueryRouting:
    """The normalised queries of every token; when training with query batch norm, the running
    statistics move toward this batch's (mean over groups of the group statistics), in place."""
    del rng
    num_groups, num_tokens, _ = x_gsd.shape
    heads, query = self.options.num_heads, self.options.query_dim
    raw = jnp.einsum(
      "gsd,dq->gsq",
      x_gsd.astype(jnp.float32),
      self.w_query[...],
      precision=jax.lax.Precision.HIGHEST,
    ).reshape(num_groups, num_tokens, heads, query)
    scale, bias = self.norm_scale[...], self.norm_bias[...]
    if self.options.query_norm == "layer":
      return QueryRouting(layer_norm_queries(raw, scale, bias))
    running = (self.running_mean[...], self.running_var[...])
    norm = lambda q_shq: query_batch_norm(
      q_shq, scale, bias, *running, train=train, momentum=self.options.bn_momentum
    )
    normed, new_mean, new_var = jax.vmap(norm)(raw)
    if train:
      self.running_mean[...] = jax.lax.stop_gradient(jnp.mean(new_mean, axis=0))
      self.running_var[...] = jax.lax.stop_gradient(jnp.mean(new_var, axis=0))
    return QueryRouting(normed)

  def compute(self, x_gsd, routing: QueryRouting, experts, *, train: bool):
    """(y [G, S, D], metrics): every token's H*K retrieved neurons, in token chunks."""
    del train
    w = experts.weights()
    if w["w_gate"] is not None or w["w_in"].shape[-1] != 1:
      raise ValueError("the peer router needs single-neuron experts without a gate branch")
    num_groups, num_tokens, dim = x_gsd.shape
    y_td, index_thk = chunked_peer_forward(
      x_gsd.reshape(-1, dim),
      routing.query_gshq.reshape(num_groups * num_tokens, *routing.query_gshq.shape[2:]),
      self.first_keys[...],
      self.second_keys[...],
      w["w_in"][:, :, 0],
      w["w_out"][:, 0, :],
      top_k=self.top_k,
      activation=w["activation"],
      token_chunk=self.options.token_chunk,
    )
    metrics = {"retrieval_usage": retrieval_usage(index_thk, self.num_experts)}
    return y_td.reshape(x_gsd.shape), metrics
