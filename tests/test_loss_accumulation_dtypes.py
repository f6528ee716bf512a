"""The train step's chunked loss, gradient accumulation and storage dtypes (train_step, optim)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import config_lib, optim, train_step
from moejax.model.transformer import Transformer
from tests.helpers import mesh_step_losses, step_losses, tiny_config


def _config(**train):
  c = tiny_config("unused")
  m, moe, t = c.model, c.model.moe, c.train
  m.num_layers, m.d_model, m.num_heads, m.d_ff, m.vocab_size = 2, 32, 4, 64, 96
  moe.num_experts, moe.group_size = 4, 16
  t.batch_size, t.seq_len, t.steps = 8, 16, 10
  c.optim.warmup_steps = 2
  for key, value in train.items():
    t[key] = value
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, c.model.vocab_size, (c.train.batch_size, c.train.seq_len + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def test_chunked_model_loss_equals_full_logits_in_value_and_grads():
  """The cross-entropy of the model's hidden states in chunks (40 tokens of 8 rows = 5
  positions at a time, the last chunk of 16 positions padded) equals the full [B, L, V] logits
  loss: value and gradient of every parameter within 1e-6; the eval sums too."""
  c = _config()
  graphdef, params, rest = nnx.split(Transformer(c.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  batch = _batch(c)

  def loss(params, chunk):
    model = nnx.merge(graphdef, params, rest)
    hidden, _ = model(batch["inputs"], train=True, rng=jax.random.key(0), return_hidden=True)
    return train_step.token_loss(model, hidden, batch["targets"], chunk)

  full, full_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, 0)))(params)
  chunked, chunked_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, 40)))(params)
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  for (path, g), want in zip(
    jax.tree_util.tree_leaves_with_path(chunked_grads), jax.tree.leaves(full_grads), strict=True
  ):
    np.testing.assert_allclose(g, want, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
  full_eval = train_step.make_eval_step(graphdef, 0)(params, rest, batch)
  chunked_eval = train_step.make_eval_step(graphdef, 40)(params, rest, batch)
  np.testing.assert_allclose(chunked_eval[0], full_eval[0], rtol=1e-6)
  assert float(chunked_eval[1]) == float(full_eval[1]) == batch["targets"].size


@pytest.mark.parametrize("layout", ["sequence", "position"])
@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_equal_one_big_batch(layout, microbatches):
  """N microbatches of 8/N rows give the losses of one batch of 8 over 6 steps (Switch top-1:
  routing groups never span microbatches, so the aux losses average exactly)."""
  c = _config(steps=6)
  c.model.moe.group_layout = layout
  c.model.moe.group_size = 2 if layout == "position" else 16
  big = step_losses(c, 6)
  c.train.microbatches = microbatches
  config_lib.validate(c, 1)
  np.testing.assert_allclose(step_losses(c, 6), big, atol=1e-5, rtol=0)
  assert big[-1] < big[0]


def test_microbatches_on_a_mesh_take_rows_from_every_device():
  """On 8 devices (2 rows each) 2 microbatches equal 1, and equal the one-device run."""
  want = step_losses(_config(batch_size=16, steps=3), 3)
  for n in (1, 2):
    c = _config(batch_size=16, steps=3, microbatches=n)
    c.mesh.data, c.mesh.expert = 2, 4
    np.testing.assert_allclose(mesh_step_losses(c, 3), want, atol=1e-5, err_msg=f"{n=}")


def test_microbatches_average_router_state_updates():
  """DeepSeek's bias after one step of 2 microbatches is the mean of the biases each
  microbatch would leave (each starting from the step's bias), and the step's loss is the big
  batch's (same bias for every microbatch's routing)."""
  c = _config(microbatches=2)
  moe = c.model.moe
  moe.router, moe.top_k, moe.group_layout, moe.group_size = "deepseek", 2, "position", 2
  moe.deepseek.bias_update_rate = 0.1
  graphdef, params, rest = nnx.split(Transformer(c.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  opt = optim.make_optimizer(c.optim, 10)
  state = train_step.new_train_state(params, rest, opt, 0)
  batch = _batch(c, seed=1)
  schedule = optim.learning_rate_schedule(c.optim, 10)
  step = lambda n: jax.jit(train_step.make_train_step(graphdef, opt, {}, schedule, microbatches=n))
  new_state, metrics = step(2)(state, batch)
  _, big_metrics = step(1)(state, batch)

  def bias_after(rows):
    model = nnx.merge(graphdef, params, rest)
    model(batch["inputs"][rows], train=True, rng=jax.random.key(0))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

  parts = [bias_after(slice(0, 4)), bias_after(slice(4, 8))]
  want = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  jax.tree.map(np.testing.assert_allclose, new_state["model_state"], want)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), want, rest))
  assert max(float(x) for x in moved) > 0  # the bias did move
  np.testing.assert_allclose(metrics["cross_entropy"], big_metrics["cross_entropy"], rtol=1e-6)


def test_bfloat16_parameters_with_float32_moments():
  """param_dtype bfloat16: parameters (router kernels excepted) are stored in bfloat16, AdamW's
  moments in float32, and a step's new parameter is the float32 AdamW update of the float32
  copies rounded once to bfloat16."""
  c = _config()
  c.model.param_dtype = "bfloat16"
  c.optim.warmup_steps = 0  # a full-size first update
  graphdef, params, rest = nnx.split(Transformer(c.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  dtypes = {
    jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  assert all(
    d == (jnp.float32 if "router" in name else jnp.bfloat16) for name, d in dtypes.items()
  ), dtypes
  opt = optim.make_optimizer(c.optim, 10)
  state = train_step.new_train_state(params, rest, opt, 0)
  assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {np.dtype("float32")}
  schedule = optim.learning_rate_schedule(c.optim, 10)
  step = jax.jit(train_step.make_train_step(graphdef, opt, {}, schedule))
  batch = _batch(c)
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  # Reference: plain optax AdamW (same settings) on float32 copies of params and gradients.
  grads = _grads(graphdef, params, rest, batch, state)
  inner = _plain_adamw(c)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  updates, _ = inner.update(f32(grads), inner.init(f32(params)), f32(params))
  want = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)
  # Two jitted programs may round the gradients differently in the last bit: 1 bf16 ulp.
  close = lambda a, b: np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2**-7, atol=0
  )
  jax.tree.map(close, new_state["params"], want)
  moved = [
    np.mean(np.asarray(a != b))
    for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params), strict=True)
  ]
  assert np.mean(moved) > 0.5
  assert {x.dtype for x in jax.tree.leaves(new_state["params"])} == {
    np.dtype(jnp.bfloat16),
    np.dtype("float32"),
  }


def _grads(graphdef, params, rest, batch, state):
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def loss(p):
    model = nnx.merge(graphdef, p, rest)
    hidden, aux = model(batch["inputs"], train=True, rng=rng, return_hidden=True)
    return train_step.token_loss(model, hidden, batch["targets"], 0)

  return jax.jit(jax.grad(loss))(params)


def _plain_adamw(c):
  o = c.optim
  adamw = optax.adamw(
    optim.learning_rate_schedule(o, 10),
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
  )
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)


def test_moment_dtype_and_default_optimizer_is_plain_adamw():
  c = _config()
  params = {"w": jnp.ones((4, 4), jnp.float32), "b": jnp.ones((4,), jnp.float32)}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  default = optim.make_optimizer(c.optim, 10)
  got = default.update(grads, default.init(params), params)
  want = _plain_adamw(c).update(grads, _plain_adamw(c).init(params), params)
  jax.tree.map(np.testing.assert_array_equal, got, want)  # float32: exactly plain AdamW
  c.optim.moment_dtype = "bfloat16"
  low = optim.make_optimizer(c.optim, 10)
  moments = [x for x in jax.tree.leaves(low.init(params)) if x.ndim]
  assert moments and {x.dtype for x in moments} == {np.dtype(jnp.bfloat16)}
  _, state = low.update(grads, low.init(params), params)
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {np.dtype(jnp.bfloat16)}
