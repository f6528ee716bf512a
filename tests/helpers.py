"""Shared test helpers: a tiny config and a small synthetic corpus (fast on 2 CPU cores)."""

from __future__ import annotations

import random

from moejax import config_lib

_WORDS = (
  "the king queen lord lady sword crown night day love death ghost castle storm sea ship "
  "speak hear see come go stay fly run fight sing weep laugh rise fall and or but with from"
).split()


def write_corpus(directory, num_files: int = 4, words_per_file: int = 6000, seed: int = 0) -> str:
  """Writes text files of pseudo-sentences; returns the glob for data.source."""
  rng = random.Random(seed)
  for i in range(num_files):
    sentences = []
    for _ in range(words_per_file // 8):
      words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
      sentences.append(" ".join(words).capitalize() + ".")
    (directory / f"doc{i}.txt").write_text("\n".join(sentences))
  return str(directory / "*.txt")


def tiny_config(source: str, **mesh):
  """2 layers (one MoE), d_model 64, 4 experts: compiles and steps in seconds."""
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 512, 2, 64, 4, 128
  moe.num_experts, moe.top_k, moe.group_size = 4, 1, 64
  t.steps, t.batch_size, t.seq_len = 8, 8, 32
  t.log_every, t.eval_every, t.checkpoint_every = 1, 4, 4
  c.data.source, c.data.eval_batches, c.data.val_fraction = source, 2, 0.1
  c.optim.warmup_steps = 2
  for axis, size in {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh}.items():
    c.mesh[axis] = size
  return c


def step_losses(cfg, steps: int, *, seed: int = 0, batches=None) -> list[float]:
  """Per-step losses of `steps` train steps of `cfg` on one device (train_step, no data files).

  Batches (unless given as a list of {"inputs", "targets"}) are learnable: each row counts up
  by 3 (mod vocab) from a start drawn from `seed`, so the loss falls within a few steps.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from moejax import optim, train_step
  from moejax.model import routers
  from moejax.model.transformer import Transformer

  t = cfg.train
  graphdef, params, rest = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(t.seed)), nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, t.steps)
  state = train_step.new_train_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, t.seed)
  step = jax.jit(
    train_step.make_train_step(
      graphdef,
      opt,
      routers.loss_weights(cfg.model.moe),
      optim.learning_rate_schedule(cfg.optim, t.steps),
      loss_chunk=t.loss_chunk,
      microbatches=t.microbatches,
    )
  )
  rng = np.random.default_rng(seed)
  losses = []
  for i in range(steps):
    if batches is None:
      start = rng.integers(0, cfg.model.vocab_size, (t.batch_size, 1))
      tokens = (start + 3 * np.arange(t.seq_len + 1)) % cfg.model.vocab_size
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    else:
      batch = batches[i]
    state, metrics = step(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), batch))
    losses.append(float(metrics["loss"]))
  return losses


def mesh_step_losses(cfg, steps: int, *, seed: int = 0) -> list[float]:
  """`step_losses` on the config's mesh (8 simulated devices), through `training.program_for`:
  the jitted step `moejax.train` runs, with its shardings. Same batches as `step_losses`."""
  import jax
  import numpy as np

  from moejax import training

  program = training.program_for(cfg, jax.devices())
  rng = np.random.default_rng(seed)
  t, vocab = cfg.train, cfg.model.vocab_size
  losses = []
  with jax.set_mesh(program.mesh):
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
    for _ in range(steps):
      start = rng.integers(0, vocab, (t.batch_size, 1))
      tokens = ((start + 3 * np.arange(t.seq_len + 1)) % vocab).astype(np.int32)
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
      state, metrics = program.step_fn(state, jax.device_put(batch, program.batch_sharding))
      losses.append(float(metrics["loss"]))
  return losses
