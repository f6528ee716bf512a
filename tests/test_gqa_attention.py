"""The model's attention (model/attention.py): grouped-query heads, QK-norm and every kernel equal
a plain softmax reference written here, in training and under the KV cache (decode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import generate, restore
from moejax.model.attention import Attention
from moejax.model.layers import apply_rope
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config

D, H, K = 32, 4, 8


def _plain_attention(module, x):
  """Causal softmax attention with K/V heads repeated per query group, float64 numpy."""
  x64 = np.asarray(x, np.float64)
  w = lambda p: np.asarray(p[...], np.float64)
  q = np.einsum("bld,dhk->blhk", x64, w(module.wq))
  k = np.einsum("bld,dhk->blhk", x64, w(module.wk))
  v = np.einsum("bld,dhk->blhk", x64, w(module.wv))
  if module.q_norm is not None:
    rms = lambda t, s: t / np.sqrt(np.mean(t * t, -1, keepdims=True) + 1e-6) * w(s.scale)
    q, k = rms(q, module.q_norm), rms(k, module.k_norm)
  q = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), module.rope_theta), np.float64)
  k = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), module.rope_theta), np.float64)
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head h reads kv h // group
  length = x.shape[1]
  s = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhlm,bmhk->blhk", p, v)
  return np.einsum("blhk,hkd->bld", out, w(module.wo))


def _module(impl, kv_heads, qk_norm):
  return Attention(
    D,
    H,
    K,
    rope_theta=1e4,
    init_std=0.3,
    out_std=0.3,
    rngs=nnx.Rngs(0),
    num_kv_heads=kv_heads,
    qk_norm=qk_norm,
    impl=impl,
  )


@pytest.mark.parametrize("impl", ["reference", "blockwise", "xla"])
@pytest.mark.parametrize("kv_heads,qk_norm", [(4, False), (2, True), (1, False)])
def test_every_kernel_equals_plain_attention(impl, kv_heads, qk_norm):
  module = _module(impl, kv_heads, qk_norm)
  assert module.wk.shape == (D, kv_heads, K) and module.wq.shape == (D, H, K)
  # 1100 positions: the blockwise kernel runs over several 512-wide tiles, the last one partial.
  x = jax.random.normal(jax.random.key(1), (2, 1100, D), jnp.float32)
  got = jax.jit(lambda x: module(x))(x)
  np.testing.assert_allclose(got, _plain_attention(module, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "blockwise", "xla"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_every_kernel_under_the_kv_cache_equals_plain_attention(impl, kv_heads):
  """A prompt of 5 tokens, then 4 single tokens at traced offsets, through `decode` over a
  [B, 12, G, K] cache: each output equals plain attention over the whole prefix."""
  module = _module(impl, kv_heads, qk_norm=kv_heads == 2)
  x = jax.random.normal(jax.random.key(2), (2, 9, D), jnp.float32)
  want = _plain_attention(module, x)
  zeros = jnp.zeros((2, 12, kv_heads, K), jnp.float32)
  cache = {"k": zeros, "v": zeros}
  step = jax.jit(lambda x, cache, offset: module.decode(x, cache, offset))
  out, cache = step(x[:, :5], cache, jnp.int32(0))
  np.testing.assert_allclose(out, want[:, :5], atol=1e-5, rtol=1e-5)
  for t in range(5, 9):
    out, cache = step(x[:, t : t + 1], cache, jnp.int32(t))
    np.testing.assert_allclose(out, want[:, t : t + 1], atol=1e-5, rtol=1e-5)
  assert cache["k"].shape == (2, 12, kv_heads, K)


def _restored(model_cfg_changes, mesh_axes=None):
  cfg = tiny_config("unused", **(mesh_axes or {"data": 2, "expert": 4}))
  for key, value in model_cfg_changes.items():
    cfg.model[key] = value
  cfg.model.moe.eval_capacity_factor = float(cfg.model.moe.num_experts)  # nothing dropped
  cfg.model.moe.group_size = 8
  mesh, rules = restore.make_inference_mesh(cfg)
  model = Transformer(cfg.model, rngs=nnx.Rngs(3), rules=rules)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return restore.RestoredModel(
    graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), 0, cfg, mesh, rules
  )


@pytest.mark.parametrize(
  "changes",
  [
    {"num_kv_heads": 2, "qk_norm": True},
    {"num_kv_heads": 1, "scan_layers": True, "attention_impl": "blockwise"},
    {"num_kv_heads": 2, "scan_layers": True, "remat": "full", "attention_impl": "xla"},
  ],
)
def test_cached_decoding_with_gqa_equals_full_recompute(changes):
  """Cached decoding ([B, M, G, K] caches, stacked under scan) gives the logits of recomputing
  the whole sequence with the training forward pass."""
  model = _restored(changes)
  prompt = np.random.default_rng(0).integers(0, 512, (8, 5), dtype=np.int32)
  tokens, logits = generate.generate(
    model, prompt, max_new_tokens=6, return_logits=True, temperature=0.0
  )
  full_seq = jnp.asarray(np.concatenate([prompt, tokens], axis=1))
  with jax.set_mesh(model.mesh):
    ref = jax.jit(lambda p, r, s: nnx.merge(model.graphdef, p, r)(s, train=False)[0])(
      model.params, model.model_state, full_seq
    )
  np.testing.assert_allclose(logits, np.asarray(ref)[:, 4:10], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(tokens, np.asarray(ref)[:, 4:10].argmax(-1))


def test_per_shard_attention_equals_the_global_kernel():
  """The shard_map wrapper the splash kernel runs in on TPU (rows and heads split over the
  mesh, here {data 2, tensor 4}), checked with the reference kernel on CPU: same output."""
  from moejax import config_lib
  from moejax import mesh as mesh_lib
  from moejax.model.attention import per_shard
  from moejax.ops import attention as attention_ops

  c = tiny_config("unused", data=2, tensor=4)
  mesh = mesh_lib.make_mesh(config_lib.resolve_mesh_shape(c.mesh, 8))
  rules = config_lib.rules_from_config(c.mesh)
  key = jax.random.key(5)
  q = jax.random.normal(key, (4, 64, 8, 16))
  k, v = (jax.random.normal(jax.random.fold_in(key, i), (4, 64, 4, 16)) for i in (1, 2))
  kernel = lambda q, k, v: attention_ops.attention(q, k, v, impl="reference")
  with jax.set_mesh(mesh):
    got = jax.jit(per_shard(kernel, rules))(q, k, v)
  np.testing.assert_allclose(got, kernel(q, k, v), atol=1e-6, rtol=1e-6)


def test_tpu_splash_on_other_devices_is_refused_before_compiling(tmp_path):
  from moejax import errors, train

  c = tiny_config("unused")
  c.model.attention_impl = "tpu_splash"
  with pytest.raises(errors.ConfigError, match=r"attention_impl='tpu_splash' needs TPU devices"):
    train.run(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()  # nothing written
