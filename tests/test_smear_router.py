"""SMEAR: causal and per-example router distributions, and exact merging of expert weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model.routers import smear
from moejax.model.transformer import Transformer
from tests.family_configs import family_config

router_probs = jax.jit(smear.smear_router_probs, static_argnames=("level",))
merged_ffn = jax.jit(smear.smear_merged_ffn, static_argnames=("activation",))


def random_router(rng, dim, num_experts):
  return dict(
    w_router_de=jnp.asarray(rng.normal(size=(dim, num_experts)), jnp.float32),
    b_router_e=jnp.asarray(rng.normal(size=(num_experts,)), jnp.float32),
    ln_scale_d=jnp.asarray(1 + 0.1 * rng.normal(size=(dim,)), jnp.float32),
    ln_bias_d=jnp.asarray(0.1 * rng.normal(size=(dim,)), jnp.float32),
  )


def random_experts(rng, num_experts, dim, hidden, glu):
  w = lambda *shape: jnp.asarray(rng.normal(size=shape) / math.sqrt(shape[-2]), jnp.float32)
  return dict(
    w_in_edf=w(num_experts, dim, hidden),
    w_gate_edf=w(num_experts, dim, hidden) if glu else None,
    w_out_efd=w(num_experts, hidden, dim),
  )


def reference_probs(x, mask, params, causal):
  """Per position: u = mean of the counted x (x_{<=t} if causal), LayerNorm, linear, softmax."""
  x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
  out = []
  for t in range(len(x)):
    rows = x[: t + 1] if causal else x
    counted = mask[: t + 1] if causal else mask
    u = rows[counted].mean(0) if counted.any() else np.zeros(x.shape[1])
    normed = (u - u.mean()) / np.sqrt(u.var() + 1e-6)
    normed = normed * np.asarray(params["ln_scale_d"]) + np.asarray(params["ln_bias_d"])
    logits = normed @ np.asarray(params["w_router_de"]) + np.asarray(params["b_router_e"])
    out.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
  return np.array(out)


def test_router_hand_case():
  # D = 2, E = 2, LN gain 1 and bias 0: a 2-vector u normalises to [-1, 1] if u0 < u1 and to
  # [1, -1] if u0 > u1. W_r = [[0, 0], [0, ln 3]], b = 0: logits [0, +-ln 3], so
  # p = [1/4, 3/4] if u0 < u1 and p = [3/4, 1/4] if u0 > u1.
  params = dict(
    w_router_de=jnp.array([[0.0, 0.0], [0.0, math.log(3.0)]]),
    b_router_e=jnp.zeros(2),
    ln_scale_d=jnp.ones(2),
    ln_bias_d=jnp.zeros(2),
  )
  x = jnp.array([[1.0, 3.0], [3.0, 5.0], [8.0, 1.0], [0.0, 0.0]])
  low, high = [0.25, 0.75], [0.75, 0.25]
  # Running means: [1, 3], [2, 4], [4, 3], [3, 2.25] -> low, low, high, high.
  causal = router_probs(x, **params, level="causal")
  np.testing.assert_allclose(causal, [low, low, high, high], rtol=1e-5)
  # Example mean [3, 2.25] -> high everywhere; masking the last two gives [2, 4] -> low.
  np.testing.assert_allclose(router_probs(x, **params, level="example"), [high] * 4, rtol=1e-5)
  masked = router_probs(x, **params, level="example", mask_s=jnp.array([1, 1, 0, 0]))
  np.testing.assert_allclose(masked, [low] * 4, rtol=1e-5)


@pytest.mark.parametrize("level", ["causal", "example"])
def test_router_matches_per_position_reference(level):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
  params = random_router(rng, 6, 4)
  probs = router_probs(x, **params, level=level, mask_s=mask)
  assert probs.dtype == jnp.float32
  expected = reference_probs(x, mask, params, causal=level == "causal")
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_causal_router_and_layer_ignore_the_future():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  params, experts = random_router(rng, 6, 3), random_experts(rng, 3, 6, 5, glu=True)
  changed = x.at[5:].set(jnp.asarray(rng.normal(size=(3, 6)) * 10, jnp.float32))

  def layer(x):
    probs = router_probs(x, **params, level="causal")
    return probs, merged_ffn(x, probs, **experts, activation=jax.nn.silu)

  (probs, y), (probs2, y2) = layer(x), layer(changed)
  np.testing.assert_array_equal(probs[:5], probs2[:5])
  np.testing.assert_allclose(y[:5], y2[:5], rtol=1e-6)
  assert not np.allclose(probs[5:], probs2[5:])
  # The per-example router does see the future: a whole-sequence mean.
  example = router_probs(x, **params, level="example")
  assert not np.allclose(example[0], router_probs(changed, **params, level="example")[0])


@pytest.mark.parametrize("glu", [False, True])
def test_merged_ffn_equals_explicitly_merged_weights_per_token(glu):
  """The pre-activation mixing equals building theta_bar = sum_e p_e theta_e for each token."""
  rng = np.random.default_rng(2)
  num_tokens, num_experts, dim, hidden = 6, 4, 5, 7
  x = jnp.asarray(rng.normal(size=(num_tokens, dim)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(num_tokens, num_experts)) * 2), axis=-1)
  experts = random_experts(rng, num_experts, dim, hidden, glu)
  activation = jax.nn.gelu
  y = merged_ffn(x, probs, **experts, activation=activation)
  w = {k: None if v is None else np.asarray(v, np.float64) for k, v in experts.items()}
  p = np.asarray(probs, np.float64)
  for t in range(num_tokens):
    merged = {k: None if v is None else np.einsum("e,e...->...", p[t], v) for k, v in w.items()}
    xt = np.asarray(x[t], np.float64)
    h = np.asarray(activation(jnp.asarray(xt @ merged["w_in_edf"])), np.float64)
    if glu:
      h = h * (xt @ merged["w_gate_edf"])
    np.testing.assert_allclose(y[t], h @ merged["w_out_efd"], rtol=1e-5, atol=1e-6)


def test_one_hot_probs_give_that_expert():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  experts = random_experts(rng, 3, 4, 6, glu=True)
  probs = jax.nn.one_hot(jnp.array([2, 0, 1]), 3)
  y = merged_ffn(x, probs, **experts, activation=jax.nn.silu)
  for t, e in enumerate([2, 0, 1]):
    h = jax.nn.silu(x[t] @ experts["w_in_edf"][e]) * (x[t] @ experts["w_gate_edf"][e])
    np.testing.assert_allclose(y[t], h @ experts["w_out_efd"][e], rtol=1e-5, atol=1e-6)


def test_gradients_finite_and_vmap_over_groups():
  rng = np.random.default_rng(4)
  x_gsd = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  params, experts = random_router(rng, 6, 3), random_experts(rng, 3, 6, 4, glu=True)

  def layer(x_sd, params, experts):
    probs = smear.smear_router_probs(x_sd, **params)
    return smear.smear_merged_ffn(x_sd, probs, **experts, activation=jax.nn.silu)

  batched = jax.jit(jax.vmap(layer, in_axes=(0, None, None)))(x_gsd, params, experts)
  for g in range(2):
    np.testing.assert_allclose(batched[g], jax.jit(layer)(x_gsd[g], params, experts), rtol=1e-5)
  loss = lambda *args: jnp.sum(jnp.square(jax.vmap(layer, in_axes=(0, None, None))(*args)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x_gsd, params, experts)
  for leaf in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).sum()) > 0


def test_rejects_unknown_level():
  params = random_router(np.random.default_rng(0), 2, 2)
  with pytest.raises(ValueError, match="level='token'"):
    smear.smear_router_probs(jnp.zeros((3, 2)), **params, level="token")


@pytest.mark.parametrize("level", ["causal", "example"])
def test_moe_layer_merges_per_sequence_whatever_the_group_size(level):
  """The smear layer on [8, 32] tokens with groups of 16 (a sequence spans two groups) and of 64
  (two sequences per group) equals a per-token loop: u = (running) mean of the token's own
  sequence, p = softmax(LN(u) W + b), one expert with weights sum_e p_e W_e."""
  x = jax.random.normal(jax.random.key(0), (8, 32, 64))
  ids = jnp.zeros((8, 32), jnp.int32)
  outputs = []
  for group_size in (16, 64):
    cfg = family_config("smear")
    cfg.model.moe.group_size, cfg.model.moe.smear.level = group_size, level
    cfg.model.moe.smear.init_std = 0.5  # decisive merge weights
    layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
    y, losses, _ = layer(x, train=True, rng=None, token_ids_bl=ids)
    assert losses == {}
    outputs.append(np.asarray(y))
  router = layer.router
  params = dict(
    w_router_de=router.kernel[...],
    b_router_e=router.bias[...],
    ln_scale_d=router.ln_scale[...],
    ln_bias_d=router.ln_bias[...],
  )
  w = {
    k: np.asarray(v, np.float64)
    for k, v in layer.experts.weights().items()
    if k[0] == "w" and v is not None
  }
  expected = np.zeros((8, 32, 64))
  for b in range(8):
    probs = reference_probs(x[b], np.ones(32, bool), params, causal=level == "causal")
    assert probs.max() > 0.5  # the merge is far from uniform
    for t in range(32):
      w_in = np.einsum("e,edf->df", probs[t], w["w_in"])
      w_out = np.einsum("e,efd->fd", probs[t], w["w_out"])
      h = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x[b, t], np.float64) @ w_in)))
      expected[b, t] = h @ w_out
  for y in outputs:
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=2e-4)


def test_sequence_mean_resets_at_every_sequence():
  x = jnp.arange(12.0).reshape(6, 2)
  ids = jnp.array([4, 4, 4, 9, 9, 2])
  causal = smear.sequence_mean(x, ids, causal=True)
  np.testing.assert_allclose(causal[:, 0], [0, 1, 2, 6, 7, 10])
  whole = smear.sequence_mean(x, ids, causal=False)
  np.testing.assert_allclose(whole[:, 0], [2, 2, 2, 7, 7, 10])
