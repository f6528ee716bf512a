"""Gradient accumulation: one optimizer step over N microbatches run one after another.

The batch's leading axis is split into N equal microbatches; `jax.lax.scan` runs the loss and
its gradient on each and averages losses, auxiliary outputs and gradients, so activation memory is
that of one microbatch. Averaging per-microbatch mean losses gives the big-batch mean exactly when
every microbatch has the same number of counted tokens (always true for unmasked, equal-shape
microbatches); with padding masks it is a mean of means. Auxiliary losses and metrics are averaged
the same way (a load-balancing loss of the big batch is not the mean of per-microbatch ones; the
averaged one is what is optimised here, as in MaxText and Megatron). Gradients accumulate in
float32 and are cast back to each parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def split_microbatches(batch: Any, microbatches: int, shards: int = 1) -> Any:
  """Every leaf [N * b, ...] -> [N, b, ...].

  With shards = 1 microbatch i holds rows i*b .. (i+1)*b - 1. When the batch axis is split over
  `shards` devices in contiguous blocks of m = N*b/shards rows, microbatch i takes rows
  i*m/N .. (i+1)*m/N - 1 of every block, so each microbatch stays spread over all the devices
  (a reshape of the sharded axis, no data movement).
  """
  if microbatches <= 0:
    raise ValueError(f"microbatches must be >= 1, got {microbatches}")
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("the batch has no arrays to split into microbatches")
  for leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] % microbatches:
      raise ValueError(
        f"batch leading size {jnp.shape(leaf)[:1]} is not divisible by microbatches="
        f"{microbatches}; make the batch size a multiple of it"
      )
  for leaf in leaves:
    if jnp.shape(leaf)[0] % (microbatches * shards):
      raise ValueError(
        f"batch leading size {jnp.shape(leaf)[0]} is not divisible by microbatches="
        f"{microbatches} x shards={shards}"
      )

  def split(x):
    blocks = x.reshape(shards, microbatches, -1, *x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape(microbatches, -1, *x.shape[1:])

  return jax.tree.map(split, batch)


def accumulate_gradients(
  loss_and_aux_fn: Callable[..., tuple[jax.Array, Any]],
  params: Any,
  batch: Any,
  *,
  microbatches: int,
  rng: jax.Array | None = None,
  shards: int = 1,
):
  """Mean loss, mean auxiliary outputs and mean gradient over N microbatches.

  Args:
    loss_and_aux_fn: `(params, microbatch) -> (scalar loss, aux pytree)`, or
      `(params, microbatch, rng) -> ...` when `rng` is given; aux holds float arrays (metrics,
      auxiliary losses) that are averaged over microbatches.
    params: the pytree differentiated.
    batch: pytree of arrays with a common leading batch axis divisible by `microbatches`.
    microbatches: N; 1 runs the function once on the whole batch (no scan).
    rng: optional PRNG key; microbatch i gets `jax.random.fold_in(rng, i)`.
    shards: devices the batch axis is split over (see `split_microbatches`).

  Returns:
    (loss, aux, grads): float32 mean loss, aux averaged leaf by leaf (float32), grads with the
    structure and dtypes of params.
  """
  stacked = split_microbatches(batch, microbatches, shards)
  grad_fn = jax.value_and_grad(loss_and_aux_fn, has_aux=True)

  def run(microbatch, index):
    extra = () if rng is None else (jax.random.fold_in(rng, index),)
    (loss, aux), grads = grad_fn(params, microbatch, *extra)
    return _to_f32((loss, aux, grads))

  if microbatches == 1:
    loss, aux, grads = run(batch, 0)
  else:
    step = lambda total, xs: (jax.tree.map(jnp.add, total, run(*xs)), None)
    shapes = jax.eval_shape(run, jax.tree.map(lambda x: x[0], stacked), 0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(step, zeros, (stacked, jnp.arange(microbatches)))
    loss, aux, grads = jax.tree.map(lambda x: x / microbatches, total)
  grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
  return loss, aux, grads


def _to_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
