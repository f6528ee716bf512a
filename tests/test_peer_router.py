"""PEER: product-key retrieval, the multi-head single-neuron layer, query batch norm, memory;
the `peer` router through the MoE layer, and the 65,536-expert tiny preset's train step."""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, optim, train_step
from moejax.model import routers
from moejax.model.routers import peer
from moejax.model.transformer import Transformer
from tests.family_configs import family_config

topk = jax.jit(peer.product_key_topk, static_argnums=(3,))
forward = jax.jit(peer.peer_forward, static_argnames=("top_k", "activation"))


def random_peer(rng, num_tokens, dim, heads, rows, query, scale=1.0):
  f = lambda *shape: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  return dict(
    x_td=f(num_tokens, dim),
    query_thq=f(num_tokens, heads, query),
    first_keys_hrj=f(heads, rows, query // 2),
    second_keys_hrj=f(heads, rows, query // 2),
    down_ed=f(rows * rows, dim),
    up_ed=f(rows * rows, dim),
  )


def full_keys(first_hrj, second_hrj):
  """Every expert's key [c_a ; c'_b], index a*R + b: [H, R*R, Q] (brute force only)."""
  first, second = np.asarray(first_hrj, np.float64), np.asarray(second_hrj, np.float64)
  heads, rows, half = first.shape
  keys = np.concatenate([np.repeat(first, rows, axis=1), np.tile(second, (1, rows, 1))], axis=-1)
  assert keys.shape == (heads, rows * rows, 2 * half)
  return keys


def test_product_key_hand_case():
  # H = 1, R = 2, Q = 2. q = [3, 1]; c = [1], [-1]; c' = [2], [.5].
  # Keys (a, b) -> index 2a + b: (0,0) 3+2 = 5, (0,1) 3+.5 = 3.5, (1,0) -3+2 = -1,
  # (1,1) -3+.5 = -2.5. Top-2: indices [0, 1], scores [5, 3.5].
  q = jnp.array([[[3.0, 1.0]]])
  first, second = jnp.array([[[1.0], [-1.0]]]), jnp.array([[[2.0], [0.5]]])
  scores, index = topk(q, first, second, 2)
  np.testing.assert_allclose(scores, [[[5.0, 3.5]]])
  np.testing.assert_array_equal(index, [[[0, 1]]])


@pytest.mark.parametrize("top_k", [1, 5, 16])
def test_product_key_topk_equals_brute_force_over_all_keys(top_k):
  rng = np.random.default_rng(top_k)
  p = random_peer(rng, num_tokens=9, dim=4, heads=3, rows=16, query=8)
  scores, index = topk(p["query_thq"], p["first_keys_hrj"], p["second_keys_hrj"], top_k)
  assert scores.shape == index.shape == (9, 3, top_k) and index.dtype == jnp.int32
  # Brute force: the score of all R^2 = 256 keys, then a full sort.
  all_scores = np.einsum(
    "thq,heq->the",
    np.asarray(p["query_thq"], np.float64),
    full_keys(p["first_keys_hrj"], p["second_keys_hrj"]),
  )
  ranked = np.sort(all_scores, axis=-1)[..., ::-1]
  np.testing.assert_allclose(scores, ranked[..., :top_k], rtol=1e-5, atol=1e-5)
  # Every returned index really has the returned score.
  np.testing.assert_allclose(
    np.take_along_axis(all_scores, np.asarray(index), axis=-1), scores, rtol=1e-5, atol=1e-5
  )
  # Ties aside the index sets agree; random floats have no near-ties at this size.
  assert np.min(ranked[..., top_k - 1] - ranked[..., top_k]) > 1e-4
  brute_index = np.argsort(-all_scores, axis=-1)[..., :top_k]
  np.testing.assert_array_equal(index, brute_index)


def test_peer_forward_equals_per_token_per_head_loop():
  rng = np.random.default_rng(0)
  top_k, heads = 4, 3
  p = random_peer(rng, num_tokens=5, dim=6, heads=heads, rows=8, query=4)
  y, index = forward(**p, top_k=top_k, activation=jax.nn.gelu)
  keys = full_keys(p["first_keys_hrj"], p["second_keys_hrj"])
  x, q = np.asarray(p["x_td"], np.float64), np.asarray(p["query_thq"], np.float64)
  down, up = np.asarray(p["down_ed"], np.float64), np.asarray(p["up_ed"], np.float64)
  gelu = lambda a: float(jax.nn.gelu(jnp.float32(a)))
  for t in range(5):
    expected = np.zeros(6)
    for h in range(heads):
      scores = keys[h] @ q[t, h]
      chosen = np.argsort(-scores)[:top_k]
      assert sorted(chosen.tolist()) == sorted(np.asarray(index[t, h]).tolist())
      gates = np.exp(scores[chosen] - scores[chosen].max())
      gates /= gates.sum()
      for i, g in zip(chosen, gates, strict=True):
        expected += gelu(down[i] @ x[t]) * g * up[i]
    np.testing.assert_allclose(y[t], expected, rtol=1e-4, atol=1e-5)


def test_gradients_are_finite_and_touch_only_retrieved_rows():
  rng = np.random.default_rng(1)
  p = random_peer(rng, num_tokens=6, dim=4, heads=2, rows=8, query=4)

  def loss(params):
    y, _ = peer.peer_forward(**params, top_k=3)
    return jnp.sum(jnp.square(y))

  grads = jax.jit(jax.grad(loss))(p)
  for name, g in grads.items():
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0, name
  _, index = forward(**p, top_k=3)
  retrieved = np.zeros(64, bool)
  retrieved[np.asarray(index).reshape(-1)] = True
  for name in ("down_ed", "up_ed"):
    moved = np.abs(np.asarray(grads[name])).sum(-1) > 0
    np.testing.assert_array_equal(moved, retrieved)  # sparse rows: only retrieved experts learn


def test_vmap_over_groups():
  rng = np.random.default_rng(2)
  p = random_peer(rng, num_tokens=4, dim=4, heads=2, rows=4, query=4)
  x_gtd = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
  q_gthq = jnp.asarray(rng.normal(size=(3, 4, 2, 4)), jnp.float32)
  shared = {k: v for k, v in p.items() if k not in ("x_td", "query_thq")}
  batched = jax.jit(jax.vmap(lambda x, q: peer.peer_forward(x, q, **shared, top_k=2)[0]))(
    x_gtd, q_gthq
  )
  for g in range(3):
    np.testing.assert_allclose(batched[g], forward(x_gtd[g], q_gthq[g], **shared, top_k=2)[0])


def test_query_batch_norm_train_eval_and_mask():
  # One feature (H = Q = 1) over T = 4 tokens [1, 2, 3, 6]: mean 3,
  # var ((-2)^2 + (-1)^2 + 0 + 3^2) / 4 = 14 / 4 = 3.5 (biased).
  q = jnp.array([1.0, 2.0, 3.0, 6.0]).reshape(4, 1, 1)
  ones, zeros = jnp.ones((1, 1)), jnp.zeros((1, 1))
  normed, mean, var = peer.query_batch_norm(q, ones, zeros, zeros, ones, train=True)
  np.testing.assert_allclose(normed[:, 0, 0], (np.array([1, 2, 3, 6]) - 3) / np.sqrt(3.5 + 1e-5))
  # Running: 0.99 * 0 + 0.01 * 3 = 0.03 and 0.99 * 1 + 0.01 * 3.5 = 1.025.
  np.testing.assert_allclose(mean, [[0.03]], rtol=1e-6)
  np.testing.assert_allclose(var, [[1.025]], rtol=1e-6)
  # Eval normalises with the running statistics and leaves them unchanged.
  normed_eval, mean_eval, var_eval = peer.query_batch_norm(
    q, 2 * ones, zeros + 1, mean, var, train=False
  )
  expected = 2 * (np.array([1, 2, 3, 6]) - 0.03) / np.sqrt(1.025 + 1e-5) + 1
  np.testing.assert_allclose(normed_eval[:, 0, 0], expected, rtol=1e-6)
  np.testing.assert_array_equal(mean_eval, mean)
  np.testing.assert_array_equal(var_eval, var)
  # A masked (padding) token does not move the statistics.
  padded = jnp.concatenate([q, jnp.full((1, 1, 1), 1000.0)])
  mask = jnp.array([True, True, True, True, False])
  normed_pad, mean_pad, var_pad = peer.query_batch_norm(
    padded, ones, zeros, zeros, ones, train=True, mask_t=mask
  )
  np.testing.assert_allclose(normed_pad[:4], normed, rtol=1e-6)
  np.testing.assert_allclose((mean_pad, var_pad), (mean, var), rtol=1e-6)


def test_query_batch_norm_statistics_per_feature():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(64, 3, 4)) * 5 + 2, jnp.float32)
  ones, zeros = jnp.ones((3, 4)), jnp.zeros((3, 4))
  normed, _, _ = jax.jit(peer.query_batch_norm, static_argnames=("train",))(
    q, ones, zeros, zeros, ones, train=True
  )
  np.testing.assert_allclose(jnp.mean(normed, axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(normed, axis=0), 1.0, rtol=1e-3)


def test_retrieval_usage_hand_case():
  # Experts 0, 3, 3, 5 of a pool of 8 were retrieved: 3 distinct of 8.
  np.testing.assert_allclose(peer.retrieval_usage(jnp.array([[[0, 3]], [[3, 5]]]), 8), 3 / 8)


def test_rejects_bad_shapes():
  rng = np.random.default_rng(0)
  p = random_peer(rng, num_tokens=2, dim=4, heads=2, rows=4, query=4)
  with pytest.raises(ValueError, match="top_k=5"):
    peer.product_key_topk(p["query_thq"], p["first_keys_hrj"], p["second_keys_hrj"], 5)
  with pytest.raises(ValueError, match="two sub-key tables"):
    peer.product_key_topk(p["query_thq"][..., :2], p["first_keys_hrj"], p["second_keys_hrj"], 2)
  with pytest.raises(ValueError, match="R\\^2=16"):
    peer.peer_forward(**(p | {"down_ed": p["down_ed"][:8]}), top_k=2)


_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s64": 8, "f64": 8}


def largest_buffer_bytes(compiled) -> int:
  """The largest array shape anywhere in the compiled program's HLO, in bytes."""
  largest = 0
  shapes = re.findall(r"\b(f32|s32|u32|bf16|f16|pred|s64|f64)\[([\d,]*)\]", compiled.as_text())
  for dtype, dims in shapes:
    size = int(np.prod([int(d) for d in dims.split(",") if d]))
    largest = max(largest, size * _DTYPE_BYTES[dtype])
  return largest


def test_65536_experts_never_build_a_tokens_by_experts_array():
  """Forward + gradient at E = 256^2, T = 512: the largest buffer is an [E, D] table."""
  tokens, heads, rows, query, dim, top_k = 512, 4, 256, 32, 32, 16
  experts = rows * rows
  shapes = dict(
    x_td=(tokens, dim),
    query_thq=(tokens, heads, query),
    first_keys_hrj=(heads, rows, query // 2),
    second_keys_hrj=(heads, rows, query // 2),
    down_ed=(experts, dim),
    up_ed=(experts, dim),
  )
  specs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

  def loss(params):
    y, _ = peer.peer_forward(**params, top_k=top_k)
    return jnp.sum(jnp.square(y))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(specs).compile()
  dense_bytes = tokens * experts * 4  # one float32 [T, E] score matrix: 128 MiB
  largest = largest_buffer_bytes(compiled)
  assert largest <= experts * dim * 4, largest  # the expert tables (and their gradients)
  assert largest * 16 <= dense_bytes
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < dense_bytes / 2, temp

  # The measurement does see a [T, E] matrix when one is built: brute-force retrieval.
  def brute(q_thq, keys_heq):
    return jax.lax.top_k(jnp.einsum("thq,heq->the", q_thq, keys_heq), top_k)

  brute_compiled = (
    jax.jit(brute)
    .lower(specs["query_thq"], jax.ShapeDtypeStruct((heads, experts, query), jnp.float32))
    .compile()
  )
  assert largest_buffer_bytes(brute_compiled) >= dense_bytes


def _brute_force_layer(x_btd, layer, train: bool):
  """Per group, token and head in float64: the query and its norm (this group's statistics
  when training, the running ones otherwise), the scores of ALL E keys, a full sort, softmax
  over the best K, GELU neurons."""
  router = layer.router
  heads, query = router.options.num_heads, router.options.query_dim
  x_gsd = np.asarray(layer.to_groups(x_btd), np.float64)
  raw = np.einsum("gsd,dq->gsq", x_gsd, np.asarray(router.w_query[...], np.float64))
  raw = raw.reshape(*x_gsd.shape[:2], heads, query)
  if train:
    mean, var = raw.mean(axis=1, keepdims=True), raw.var(axis=1, keepdims=True)
  else:
    mean, var = np.asarray(router.running_mean[...]), np.asarray(router.running_var[...])
  q = (raw - mean) / np.sqrt(var + peer.BN_EPS) * np.asarray(router.norm_scale[...])
  q = q + np.asarray(router.norm_bias[...])
  keys = full_keys(router.first_keys[...], router.second_keys[...])
  down = np.asarray(layer.experts.w_in[...], np.float64)[:, :, 0]
  up = np.asarray(layer.experts.w_out[...], np.float64)[:, 0, :]
  y = np.zeros_like(x_gsd)
  for g, s in np.ndindex(*x_gsd.shape[:2]):
    for h in range(heads):
      scores = keys[h] @ q[g, s, h]
      best = np.argsort(-scores, kind="stable")[: router.top_k]
      gates = np.exp(scores[best] - scores[best].max())
      gates /= gates.sum()
      act = np.asarray(jax.nn.gelu(jnp.asarray(down[best] @ x_gsd[g, s])), np.float64)
      y[g, s] += (gates * act) @ up[best]
  return y, raw


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_moe_layer_equals_brute_force_retrieval(train):
  cfg = family_config("peer")  # E = 16 (R = 4), K = 2, H = 2, Q = 8, groups of 8 sequences
  cfg.model.moe.peer.init_std = 0.5
  cfg.model.moe.peer.token_chunk = 48  # chunks that do not divide the 256 tokens: padding
  layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
  if not train:  # non-trivial running statistics
    layer.router.running_mean[...] = 0.1 * jnp.arange(16.0).reshape(2, 8)
    layer.router.running_var[...] = 1.0 + 0.05 * jnp.arange(16.0).reshape(2, 8)
  x = jax.random.normal(jax.random.key(0), (8, 32, 64))
  expected, raw = _brute_force_layer(x, layer, train)
  before = np.asarray(layer.router.running_mean[...])
  y, losses, metrics = layer(x, train=train, rng=None)
  np.testing.assert_allclose(np.asarray(layer.to_groups(y)), expected, atol=1e-4, rtol=1e-4)
  assert losses == {} and 0 < float(metrics["retrieval_usage"]) <= 1
  new_mean = np.asarray(layer.router.running_mean[...])
  if train:  # momentum 0.99 toward the mean over groups of the group means
    np.testing.assert_allclose(new_mean, 0.99 * before + 0.01 * raw.mean(axis=(0, 1)), atol=1e-6)
  else:
    np.testing.assert_array_equal(new_mean, before)


def _tiny_peer_config():
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "peer.py"
  spec = importlib.util.spec_from_file_location("peer_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def test_tiny_preset_with_65536_experts_trains_without_a_tokens_by_experts_buffer():
  """configs/peer.py:tiny (E = 256^2 per layer, 2048 tokens a step): the compiled train step's
  largest buffer is far below one float32 [tokens, E] matrix, and three steps train (the first
  at learning rate 0, the start of the warmup)."""
  cfg = _tiny_peer_config()
  assert cfg.model.moe.num_experts == 65536
  config_lib.validate(cfg, 1)
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, 0)
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  step = jax.jit(
    train_step.make_train_step(graphdef, opt, routers.loss_weights(cfg.model.moe), schedule)
  )
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  tokens = jax.random.randint(jax.random.key(0), (shape[0], shape[1] + 1), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  compiled = step.lower(state, batch).compile()
  dense_bytes = shape[0] * shape[1] * cfg.model.moe.num_experts * 4  # 512 MiB
  largest = largest_buffer_bytes(compiled)
  table_bytes = cfg.model.moe.num_experts * cfg.model.d_model * 4  # one [E, D] table: 64 MiB
  assert largest <= table_bytes, (largest, table_bytes)
  assert largest * 8 <= dense_bytes
  losses = []
  for _ in range(3):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[2] < losses[0], losses
