"""Remat policies (moejax.ops.remat): they change what XLA keeps, never the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from moejax.ops import attention, remat

LAYERS, TOKENS, WIDTH = 4, 64, 32


def _layer(x_td, w):
  """A toy block: a tagged "query" projection and a tagged MLP input, tanh in between.

  Its backward needs q, tanh(q), h and tanh(h) (besides x): "none" keeps all four, "minimal"
  keeps the two matmul results q and h, "save_qkv_proj" keeps q only, "full" keeps none.
  """
  q_tf = checkpoint_name(x_td @ w["wq"], remat.QUERY_PROJ)
  h_tf = checkpoint_name(jnp.tanh(q_tf) @ w["wi"], remat.MLP_WI)
  return x_td + jnp.tanh(h_tf) @ w["wo"]


def _stack_loss(policy: str):
  body = remat.remat(lambda x, w: (_layer(x, w), None), policy, prevent_cse=False)

  def loss(weights, x_td):
    y_td, _ = jax.lax.scan(body, x_td, weights)
    return jnp.sum(y_td**2)

  return loss


def _inputs():
  rng = np.random.default_rng(0)
  shapes = {"wq": (WIDTH, 4 * WIDTH), "wi": (4 * WIDTH, 4 * WIDTH), "wo": (4 * WIDTH, WIDTH)}
  weights = {
    n: jnp.asarray(0.1 * rng.standard_normal((LAYERS, *s)), jnp.float32) for n, s in shapes.items()
  }
  return weights, jnp.asarray(rng.standard_normal((TOKENS, WIDTH)), jnp.float32)


def test_policies_change_temp_memory_but_not_gradients():
  weights, x = _inputs()
  temp, grads = {}, {}
  for policy in ("none", "minimal", "save_qkv_proj", "full"):
    step = jax.jit(jax.grad(_stack_loss(policy)))
    temp[policy] = step.lower(weights, x).compile().memory_analysis().temp_size_in_bytes
    grads[policy] = step(weights, x)
  # Per layer: none keeps 4 [T, 4W] tensors, minimal 2, save_qkv_proj 1, full 0.
  assert temp["none"] > temp["minimal"] > temp["save_qkv_proj"] > temp["full"], temp
  saved_one = LAYERS * TOKENS * 4 * WIDTH * 4  # bytes of one [T, 4W] float32 tensor per layer
  assert temp["minimal"] - temp["full"] >= 2 * saved_one, temp
  for policy, g in grads.items():
    for name in g:
      np.testing.assert_allclose(g[name], grads["none"][name], rtol=1e-6, err_msg=policy)


@pytest.mark.parametrize("policy", sorted(remat.POLICIES))
def test_every_policy_gives_the_same_gradients(policy):
  weights, x = _inputs()
  want = jax.grad(_stack_loss("none"))(weights, x)
  got = jax.grad(_stack_loss(policy))(weights, x)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_unknown_policy_lists_the_names():
  with pytest.raises(ValueError, match="unknown remat policy 'minmal'; choose one of none, full"):
    remat.remat_policy("minmal")
  assert remat.remat(jnp.sin, "none") is jnp.sin


@pytest.mark.parametrize("policy", ["full", "minimal", "minimal_with_context"])
def test_blockwise_attention_inside_a_checkpointed_layer(policy):
  """The custom_vjp of blockwise attention composes with jax.checkpoint: same gradients."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 40, 4, 8)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((1, 40, 2, 8)), jnp.float32)
  w = jnp.asarray(0.2 * rng.standard_normal((4, 8, 8)), jnp.float32)

  def layer(q, w):
    out = attention.blockwise_attention(q, kv, kv, block_q=16, block_k=16)
    out = checkpoint_name(out, remat.CONTEXT)
    return jnp.tanh(jnp.einsum("blhk,hkj->blhj", out, w))

  def grads(fn):
    return jax.jit(jax.grad(lambda q, w: jnp.sum(fn(q, w) ** 2), (0, 1)))(q, w)

  for got, want in zip(grads(remat.remat(layer, policy)), grads(layer), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
