"""The `dropless` dispatch: every valid (token, expert) pair is computed; no capacity, no drops.

Pairs of all groups are pooled (a token's output does not depend on which other tokens share its
expert, so pooling changes nothing but cost), laid out contiguously by expert, and run through a
grouped matmul. Two grouped matmuls, picked per backend by measurement (docs/PERFORMANCE.md):

- "blocked" (the CPU default): pairs are scattered into rows padded so that each expert owns
  whole blocks of `b` rows; a `lax.scan` over blocks multiplies each block by its expert's
  weights, skipping blocks past the last used one (`lax.cond`). The row count is a static upper
  bound, R = (ceil(M / b) + E) * b for M pairs, so it compiles once; executed FLOPs are those of
  the used blocks, about M + E * b / 2 rows. The backward is a custom VJP: another scan that
  accumulates the weight gradient in place per block, instead of the full-size zero + add that
  differentiating a dynamic slice inside a scan would build each step.
- "ragged_dot" (GPU/TPU default): pairs sorted by expert and `jax.lax.ragged_dot` with the
  per-expert counts. XLA:CPU lowers it to a masked dense matmul over all E experts,
  so it costs ~E x the active FLOPs there; accelerators have grouped-matmul kernels.

Shapes: G groups, S tokens per group, D d_model, F expert hidden, E experts, N pairs per group,
M = G * N pooled pairs, T = G * S pooled tokens, R padded rows, b rows per block, Q = R / b blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("blocked", "ragged_dot")


def default_grouped_matmul(backend: str | None = None) -> str:
  """The measured-faster grouped matmul for a backend: "blocked" on CPU, else "ragged_dot"."""
  return "blocked" if (backend or jax.default_backend()) == "cpu" else "ragged_dot"


def block_rows(num_pairs: int, num_experts: int) -> int:
  """Rows per block b: about half the mean rows per expert, a power of two in [16, 128].

  Each block reads its expert's weights once, so tiny blocks are memory bound (block sizes
  measured in docs/PERFORMANCE.md); big blocks waste up to b - 1 padded rows per expert
  (E * b / 2 on average). Static: a function of the shapes only.
  """
  target = max(1.0, num_pairs / num_experts / 2)
  return int(min(128, max(16, 2 ** math.floor(math.log2(target)))))


# ---------------------------------------------------------------------------------------------
# Blocked grouped matmul: y[block q] = x[block q] @ w[expert of q], with a custom VJP.


@jax.custom_vjp
def block_dot(x_qbd, w_edf, expert_q, used_q):
  """Per-block matmul: y[q] = x[q] @ w[expert_q[q]] for used blocks, zeros for unused ones.

  Args:
    x_qbd: [Q, b, D] rows in blocks; all rows of a block belong to one expert.
    w_edf: [E, D, F] stacked weights.
    expert_q: int32[Q] expert of each block.
    used_q: bool[Q] False for blocks past the last used one (skipped, output zero).

  Returns:
    y_qbf: [Q, b, F].
  """
  return _block_dot_fwd(x_qbd, w_edf, expert_q, used_q)[0]


def _block_dot_fwd(x_qbd, w_edf, expert_q, used_q):
  out_shape = (x_qbd.shape[1], w_edf.shape[2])

  def body(_, inputs):
    x_bd, e, used = inputs
    y_bf = jax.lax.cond(
      used,
      lambda: jnp.dot(x_bd, w_edf[e], preferred_element_type=x_bd.dtype),
      lambda: jnp.zeros(out_shape, x_bd.dtype),
    )
    return None, y_bf

  _, y_qbf = jax.lax.scan(body, None, (x_qbd, expert_q, used_q))
  return y_qbf, (x_qbd, w_edf, expert_q, used_q)


def _block_dot_bwd(res, g_qbf):
  x_qbd, w_edf, expert_q, used_q = res

  def body(dw_edf, inputs):
    x_bd, g_bf, e, used = inputs

    def step():
      dx_bd = jnp.dot(g_bf, w_edf[e].T, preferred_element_type=x_bd.dtype)
      # In-place update of one expert's slice of the carried gradient (float32 accumulator, so
      # bf16 compute does not round the sum over blocks).
      dw_df = jax.lax.dynamic_index_in_dim(dw_edf, e, keepdims=False) + jnp.dot(
        x_bd.T, g_bf, preferred_element_type=jnp.float32
      )
      return jax.lax.dynamic_update_index_in_dim(dw_edf, dw_df, e, 0), dx_bd

    return jax.lax.cond(used, step, lambda: (dw_edf, jnp.zeros_like(x_bd)))

  dw0_edf = jnp.zeros(w_edf.shape, jnp.float32)
  dw_edf, dx_qbd = jax.lax.scan(body, dw0_edf, (x_qbd, g_qbf, expert_q, used_q))
  return dx_qbd, dw_edf.astype(w_edf.dtype), None, None


block_dot.defvjp(_block_dot_fwd, _block_dot_bwd)


# ---------------------------------------------------------------------------------------------
# Layouts: where each pooled pair goes, for each grouped matmul.


def blocked_layout(expert_m, valid_m, num_experts: int, block: int):
  """Row of each pair in a block-padded, expert-contiguous layout.

  Args:
    expert_m: int32[M] expert of each pair.
    valid_m: bool[M].
    num_experts: E.
    block: b, rows per block.

  Returns:
    row_m: int32[M] destination row in [0, R), or R (out of bounds) for invalid pairs.
    expert_q: int32[Q] expert of each block.
    used_q: bool[Q] whether the block holds any row of the padded layout.
  """
  num_pairs = expert_m.shape[0]
  num_blocks = -(-num_pairs // block) + num_experts  # sum_e ceil(c_e / b) <= ceil(M / b) + E
  num_rows = num_blocks * block
  count_e = jnp.zeros((num_experts,), jnp.int32).at[expert_m].add(valid_m.astype(jnp.int32))
  # Rank of a pair among the valid pairs of its expert: its position in a stable sort by
  # expert (invalid pairs sort last) minus the number of valid pairs of smaller experts.
  key_m = jnp.where(valid_m, expert_m, num_experts)
  order_m = jnp.argsort(key_m, stable=True)
  position_m = jnp.zeros((num_pairs,), jnp.int32).at[order_m].set(jnp.arange(num_pairs))
  start_e = jnp.cumsum(count_e) - count_e
  rank_m = position_m - start_e[expert_m]
  padded_e = -(-count_e // block) * block
  padded_end_e = jnp.cumsum(padded_e)
  row_m = padded_end_e[expert_m] - padded_e[expert_m] + rank_m
  row_m = jnp.where(valid_m, row_m, num_rows).astype(jnp.int32)
  block_start_q = jnp.arange(num_blocks, dtype=jnp.int32) * block
  # Expert of a block: how many experts' padded rows end at or before the block's first row.
  expert_q = jnp.searchsorted(padded_end_e, block_start_q, side="right").astype(jnp.int32)
  used_q = block_start_q < padded_end_e[-1]
  return row_m, jnp.minimum(expert_q, num_experts - 1), used_q


def sorted_layout(expert_m, valid_m, num_experts: int):
  """Row of each pair when sorted by expert (invalid pairs last), and the per-expert counts.

  Returns:
    row_m: int32[M] position in the sorted order (a permutation of [0, M)).
    count_e: int32[E] valid pairs per expert (the ragged_dot group sizes).
  """
  num_pairs = expert_m.shape[0]
  order_m = jnp.argsort(jnp.where(valid_m, expert_m, num_experts), stable=True)
  row_m = jnp.zeros((num_pairs,), jnp.int32).at[order_m].set(jnp.arange(num_pairs))
  count_e = jnp.zeros((num_experts,), jnp.int32).at[expert_m].add(valid_m.astype(jnp.int32))
  return row_m, count_e


# ---------------------------------------------------------------------------------------------
# The expert FFN on grouped rows.


def grouped_ffn(x_rd, weights: dict, matmul) -> jax.Array:
  """act(x @ w_in[e]) (* x @ w_gate[e]) @ w_out[e] for rows grouped by expert.

  Args:
    x_rd: [R, D] rows, grouped by expert in the layout `matmul` expects.
    weights: `ExpertBank.weights()`: w_in/w_gate [E, D, F], w_out [E, F, D], activation.
    matmul: (rows [R, K], weights [E, K, J]) -> [R, J], the grouped matmul.
  """
  dtype = x_rd.dtype
  h_rf = weights["activation"](matmul(x_rd, weights["w_in"].astype(dtype)))
  if weights["w_gate"] is not None:
    h_rf = h_rf * matmul(x_rd, weights["w_gate"].astype(dtype))
  return matmul(h_rf, weights["w_out"].astype(dtype))


def dropless_pairs(
  x_td,
  token_m,
  expert_m,
  weight_m,
  valid_m,
  weights: dict,
  *,
  num_experts: int,
  grouped_matmul: str | None = None,
):
  """y_t = sum over valid pairs m of token t: weight_m * expert_{e_m}(x_t), every pair computed.

  Args:
    x_td: [T, D] tokens.
    token_m, expert_m: int32[M] token and expert of each pair.
    weight_m: float[M] combine weights.
    valid_m: bool[M] pairs to compute (others contribute nothing).
    weights: `ExpertBank.weights()`.
    num_experts: E.
    grouped_matmul: "blocked" or "ragged_dot"; None = `default_grouped_matmul()`.

  Returns:
    y_td: float32[T, D].
  """
  kind = grouped_matmul or default_grouped_matmul()
  num_tokens, dim = x_td.shape
  num_pairs = token_m.shape[0]
  if kind == "blocked":
    block = block_rows(num_pairs, num_experts)
    row_m, expert_q, used_q = blocked_layout(expert_m, valid_m, num_experts, block)
    num_rows = expert_q.shape[0] * block
    to_blocks = lambda a_rk: a_rk.reshape(-1, block, a_rk.shape[-1])
    matmul = lambda a_rk, w_ekj: block_dot(to_blocks(a_rk), w_ekj, expert_q, used_q).reshape(
      num_rows, -1
    )
  elif kind == "ragged_dot":
    row_m, count_e = sorted_layout(expert_m, valid_m, num_experts)
    num_rows = num_pairs
    matmul = lambda a_rk, w_ekj: jax.lax.ragged_dot(a_rk, w_ekj, count_e)
  else:
    raise ValueError(f"unknown grouped_matmul {kind!r}; known: {GROUPED_MATMULS}")
  # Gather each pair's token into its row; invalid pairs point out of bounds and are dropped.
  x_rd = jnp.zeros((num_rows, dim), x_td.dtype).at[row_m].add(x_td[token_m], mode="drop")
  y_rd = grouped_ffn(x_rd, weights, matmul)
  y_md = y_rd.at[row_m].get(mode="fill", fill_value=0).astype(jnp.float32)
  contrib_md = jnp.where(valid_m[:, None], y_md * weight_m.astype(jnp.float32)[:, None], 0.0)
  return jnp.zeros((num_tokens, dim), jnp.float32).at[token_m].add(contrib_md)


def dropless_groups(
  x_gsd, token_gn, expert_gn, weight_gn, valid_gn, weights, *, num_experts, grouped_matmul
):
  """`dropless_pairs` on pooled groups: pair (g, n) refers to pooled token g * S + token."""
  num_groups, num_tokens, dim = x_gsd.shape
  offset_g1 = (jnp.arange(num_groups, dtype=jnp.int32) * num_tokens)[:, None]
  y_td = dropless_pairs(
    x_gsd.reshape(-1, dim),
    (token_gn + offset_g1).reshape(-1),
    expert_gn.reshape(-1),
    weight_gn.reshape(-1),
    valid_gn.reshape(-1),
    weights,
    num_experts=num_experts,
    grouped_matmul=grouped_matmul,
  )
  return y_td.reshape(x_gsd.shape)
