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

Integration notes: the layer needs its own expert compute (no dispatch or capacity: every token
gathers its H*K rows of U and V), the query projection W_q [D, H*Q] and the BN statistics as
non-parameter state updated at training time. The gradient of the gathers is a scatter-add
into dense [E, D] tables (plus optimizer moments): size E for the chip, and chunk long token
axes (each gathered table is T*H*K*D values). Retrieval is per token, so the layer is causal in
the 'sequence' layout at eval; at training, batch-norm statistics are computed over all tokens
of the batch (future ones included), a weak leak through two [H, Q] statistics: offer a
per-token norm (RMSNorm / LayerNorm) for strict causality. Decoding needs no cache beyond the
running BN statistics (eval mode).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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
