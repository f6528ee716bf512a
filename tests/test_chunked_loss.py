"""Chunked cross-entropy (moejax.ops.losses) against the full-logits loss and a per-token loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import losses

T, D, V = 37, 16, 50  # 37 tokens: chunks of 8 leave a tail of 5


def _inputs(seed=0, tokens=T):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((tokens, D)), jnp.float32)
  unembed = jnp.asarray(0.3 * rng.standard_normal((D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, tokens), jnp.int32)
  mask = jnp.asarray(rng.random(tokens) < 0.8)
  return hidden, unembed, targets, mask


def test_full_loss_matches_per_token_loop():
  hidden, unembed, targets, mask = _inputs()
  logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
  total = count = 0.0
  for t in range(T):
    if mask[t]:
      lse = np.log(np.sum(np.exp(logits[t] - logits[t].max()))) + logits[t].max()
      total += lse - logits[t, targets[t]] + 1e-2 * lse**2
      count += 1
  got = losses.full_nll_sum(hidden, unembed, targets, mask=mask, z_loss_weight=1e-2)
  np.testing.assert_allclose(got, (total, count), rtol=1e-6)


@pytest.mark.parametrize("chunk", [8, 37, 64])
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-2])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_full_in_value_and_grads(chunk, z_loss_weight, masked):
  hidden, unembed, targets, mask = _inputs()
  kw = dict(mask=mask if masked else None, z_loss_weight=z_loss_weight)

  def full(h, w):
    return losses.full_cross_entropy(h, w, targets, **kw)

  def chunked(h, w):
    return losses.chunked_cross_entropy(h, w, targets, chunk=chunk, **kw)

  want, want_grads = jax.jit(jax.value_and_grad(full, (0, 1)))(hidden, unembed)
  got, got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1)))(hidden, unembed)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name, g_got, g_want in zip(("hidden", "unembed"), got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g_got, g_want, atol=1e-6, err_msg=name)
  # Without differentiation (evaluation) the primal path gives the same sum and count.
  full_sum = losses.full_nll_sum(hidden, unembed, targets, **kw)
  np.testing.assert_allclose(
    losses.chunked_nll_sum(hidden, unembed, targets, chunk=chunk, **kw), full_sum, rtol=1e-6
  )


def test_padding_tokens_get_zero_gradient_and_batch_shapes_flatten():
  hidden, unembed, targets, mask = _inputs()
  grad = jax.grad(lambda h: losses.chunked_cross_entropy(h, unembed, targets, chunk=8, mask=mask))
  d_hidden = grad(hidden)
  assert not np.any(np.asarray(d_hidden)[~np.asarray(mask)])
  # [B, L, D] input equals the flattened [T, D] one.
  h_bld, t_bl, m_bl = hidden[:36].reshape(4, 9, D), targets[:36].reshape(4, 9), mask[:36]
  flat = losses.chunked_nll_sum(hidden[:36], unembed, targets[:36], chunk=8, mask=m_bl)
  batched = losses.chunked_nll_sum(h_bld, unembed, t_bl, chunk=8, mask=m_bl.reshape(4, 9))
  np.testing.assert_allclose(batched, flat, rtol=1e-6)


def test_bf16_hidden_accumulates_in_float32():
  hidden, unembed, targets, _ = _inputs()
  low = hidden.astype(jnp.bfloat16)

  def grads(fn, h):
    return jax.jit(jax.value_and_grad(fn, (0, 1)))(h, unembed)

  full = grads(lambda h, w: losses.full_cross_entropy(h, w, targets), low)
  chunked = grads(lambda h, w: losses.chunked_cross_entropy(h, w, targets, chunk=8), low)
  f32 = grads(lambda h, w: losses.full_cross_entropy(h, w, targets), low.astype(jnp.float32))
  assert chunked[0].dtype == jnp.float32 and chunked[1][0].dtype == jnp.bfloat16
  # Same bf16 inputs, float32 logits and softmax in both: equal up to float32 rounding.
  np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6)
  # Against float32 matmuls on the same (bf16-rounded) hidden states: only the bf16 rounding of
  # the unembedding matters (2^-9 relative), not any bf16 accumulation over D or V.
  np.testing.assert_allclose(chunked[0], f32[0], rtol=4e-3)
  np.testing.assert_allclose(chunked[1][1], f32[1][1], atol=2e-3)
  np.testing.assert_allclose(chunked[1][0].astype(jnp.float32), f32[1][0], atol=2e-3)


def test_bad_arguments_raise_one_line_errors():
  hidden, unembed, targets, mask = _inputs()
  with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
    losses.chunked_cross_entropy(hidden, unembed, targets, chunk=0)
  with pytest.raises(ValueError, match=r"hidden \(37, 16\) must be targets \(36,\)"):
    losses.chunked_cross_entropy(hidden, unembed, targets[:36], chunk=8)
  with pytest.raises(ValueError, match=r"mask shape \(36,\) must equal targets shape \(37,\)"):
    losses.chunked_cross_entropy(hidden, unembed, targets, chunk=8, mask=mask[:36])


def _fwd_bwd_temp_bytes(fn, tokens, vocab=8192, d_model=64):
  h = jax.ShapeDtypeStruct((tokens, d_model), jnp.float32)
  w = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
  t = jax.ShapeDtypeStruct((tokens,), jnp.int32)
  step = jax.jit(jax.value_and_grad(fn, (0, 1)))
  return step.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_does_not_scale_with_tokens_times_vocab():
  logits_bytes = 4096 * 8192 * 4  # float32 [T, V] at T = 4096
  chunked = [
    _fwd_bwd_temp_bytes(lambda h, w, t: losses.chunked_cross_entropy(h, w, t, chunk=256), n)
    for n in (4096, 8192)
  ]
  full = [_fwd_bwd_temp_bytes(losses.full_cross_entropy, n) for n in (4096, 8192)]
  # Doubling T adds at least one [T, V] logits tensor to the full loss, almost nothing here.
  assert full[1] - full[0] >= logits_bytes, full
  assert chunked[1] - chunked[0] < logits_bytes / 10, chunked
  assert chunked[1] < logits_bytes / 4, chunked
