"""Rematerialisation (activation checkpointing) policies by the names MaxText users know.

A policy decides which intermediates of a checkpointed function (one transformer layer) the
forward pass keeps for the backward; everything else is recomputed. Names:

- "none": no checkpoint at all: every intermediate is kept (fastest, most memory).
- "full": keep nothing but the layer's inputs, recompute the whole layer (least memory).
- "minimal" (= "dots_with_no_batch_dims_saveable"): keep the results of matmuls without batch
  dimensions (weight projections); recompute elementwise ops, norms, softmax, and batched
  einsums such as attention scores and per-expert matmuls (their einsums carry the expert axis).
- "dots_saveable": keep every matmul result, batched ones included.
- "save_qkv_proj", "save_out_proj", "save_dot_except_mlp", "save_dot_except_mlpwi",
  "save_dot_with_context_except_mlp", "minimal_with_context": keep only the intermediates the
  model tagged with `jax.ad_checkpoint.checkpoint_name(x, NAME)` for the names below; an untagged
  model saves nothing under them (same as "full").

Tags (MaxText's): QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ (fused), OUT_PROJ (attention output
projection), CONTEXT (attention output before OUT_PROJ), MLP_WI (MLP input projection), MLP_WO.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ = "query_proj", "key_proj", "value_proj", "qkv_proj"
OUT_PROJ, CONTEXT, MLP_WI, MLP_WO = "out_proj", "context", "mlpwi", "mlpwo"

_cp = jax.checkpoint_policies
_QKV = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ)
POLICIES: dict[str, Callable | None] = {
  "none": None,
  "full": _cp.nothing_saveable,
  "minimal": _cp.dots_with_no_batch_dims_saveable,
  "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
  "dots_saveable": _cp.dots_saveable,
  "minimal_with_context": _cp.save_from_both_policies(
    _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names(CONTEXT)
  ),
  "save_qkv_proj": _cp.save_only_these_names(*_QKV),
  "save_out_proj": _cp.save_only_these_names(OUT_PROJ),
  "save_dot_except_mlp": _cp.save_only_these_names(*_QKV, OUT_PROJ),
  "save_dot_except_mlpwi": _cp.save_only_these_names(*_QKV, OUT_PROJ, MLP_WO),
  "save_dot_with_context_except_mlp": _cp.save_only_these_names(*_QKV, CONTEXT, OUT_PROJ),
}


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of `name`; None for "none" (do not checkpoint)."""
  if name not in POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(POLICIES)}")
  return POLICIES[name]


def remat(fn: Callable, name: str, *, prevent_cse: bool = True, static_argnums=()) -> Callable:
  """`fn` under `jax.checkpoint` with policy `name`; `fn` itself for "none".

  Pass prevent_cse=False when `fn` is the body of a `jax.lax.scan` (scan already keeps XLA from
  merging the recomputation with the forward pass, and the barrier costs speed).
  """
  policy = remat_policy(name)
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums)
