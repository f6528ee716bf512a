"""AdamW with linear warmup + cosine decay and global-norm clipping.

Dtypes: the update is computed in float32 whatever the parameters' storage dtype (gradients and
parameters are cast up before clipping, AdamW and weight decay); the two moments are stored in
`optim.moment_dtype` (float32 default); `optax.apply_updates` adds the float32 update to the
parameter and rounds once to its storage dtype (`model.param_dtype`). There is no separate
float32 master copy of bfloat16 parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  o = optim_cfg
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=o.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=o.learning_rate * o.end_lr_ratio,
  )


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Weight decay applies to matrices only (not norm scales)."""
  o = optim_cfg
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(
    learning_rate_schedule(o, total_steps),
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    mask=decay_mask,
  )
  inner = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
  moment_dtype = _DTYPES[getattr(o, "moment_dtype", "float32")]
  return in_float32(inner, moment_dtype)


def in_float32(inner: optax.GradientTransformation, state_dtype) -> optax.GradientTransformation:
  """`inner` run in float32 on float32 copies of gradients and parameters; its floating state
  (the moments) stored in `state_dtype`. The state keeps `inner`'s structure (shardings and
  checkpoints see the same tree); with float32 everything it computes exactly what `inner` does.
  """

  def up(tree):
    return jax.tree.map(lambda x: _cast(x, jnp.float32), tree)

  def store(state):
    return jax.tree.map(lambda x: _cast(x, state_dtype), state)

  def init(params):
    return store(inner.init(up(params)))

  def update(grads, state, params=None):
    updates, state = inner.update(up(grads), up(state), None if params is None else up(params))
    return updates, store(state)

  return optax.GradientTransformation(init, update)


def _cast(x, dtype):
  return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
