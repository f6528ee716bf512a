"""AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax


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
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw
