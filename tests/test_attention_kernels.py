"""Attention kernels (moejax.ops.attention): every CPU-runnable path against the reference, the
reference against a per-(batch, head, query) numpy loop, and the memory of the blockwise path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import attention as attn

TOL = 1e-5


def _rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _loop_attention(q, k, v, q_offset, kv_len, causal):
  """Brute force: one softmax per (batch, head, query) in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  (b, length, h, d), m, g = q.shape, k.shape[1], k.shape[2]
  out = np.zeros(q.shape)
  for bi in range(b):
    limit = m if kv_len is None else min(m, int(np.broadcast_to(kv_len, (b,))[bi]))
    for hi in range(h):
      gi = hi // (h // g)  # query head h reads key/value head h // (H / G)
      for li in range(length):
        keys = [mi for mi in range(limit) if not causal or mi <= q_offset + li]
        if not keys:
          continue
        s = k[bi, keys, gi] @ q[bi, li, hi] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, li, hi] = (p / p.sum()) @ v[bi, keys, gi]
  return out


# (batch, L, M, H, G, q_offset, kv_len, causal): prefill, GQA/MQA, decode with L = 1 and L > 1,
# ragged kv_len, non-causal, lengths that do not divide the test block sizes (4 and 8).
CASES = {
  "prefill_mha": (2, 11, 11, 2, 2, 0, None, True),
  "prefill_gqa": (1, 13, 13, 4, 2, 0, None, True),
  "prefill_mqa": (2, 9, 9, 3, 1, 0, None, True),
  "decode_one": (2, 1, 19, 4, 2, 7, None, True),
  "decode_many": (2, 5, 21, 4, 1, 9, None, True),
  "ragged_kv_len": (2, 6, 17, 2, 1, 3, np.array([5, 14], np.int32), True),
  "full_kv_len": (2, 7, 10, 2, 2, 0, np.array([10, 3], np.int32), False),
}


def _inputs(case, seed=0):
  b, length, m, h, g, offset, kv_len, causal = CASES[case]
  q, k, v = (
    _rand(seed, (b, length, h, 8)),
    _rand(seed + 1, (b, m, g, 8)),
    _rand(seed + 2, (b, m, g, 8)),
  )
  return q, k, v, dict(q_offset=offset, kv_len=kv_len, causal=causal)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_loop(case):
  q, k, v, kw = _inputs(case)
  expected = _loop_attention(q, k, v, kw["q_offset"], kw["kv_len"], kw["causal"])
  got = jax.jit(lambda q, k, v: attn.reference_attention(q, k, v, **kw))(q, k, v)
  np.testing.assert_allclose(got, expected, atol=TOL)


def _blockwise(q, k, v, **kw):
  return attn.blockwise_attention(q, k, v, block_q=4, block_k=8, **kw)


KERNELS = {"blockwise": _blockwise, "xla": attn.xla_fused_attention}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_values_and_grads_match_reference(kernel, case):
  q, k, v, kw = _inputs(case)
  cotangent = _rand(9, q.shape)
  offset = jnp.int32(kw.pop("q_offset"))  # traced, as when decoding inside jit

  def value_and_grads(fn):
    def loss(q, k, v, off):
      out = fn(q, k, v, q_offset=off, **kw)
      return jnp.sum(out * cotangent), out

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v, offset)

  (_, want), want_grads = value_and_grads(attn.reference_attention)
  (_, got), got_grads = value_and_grads(KERNELS[kernel])
  np.testing.assert_allclose(got, want, atol=TOL)
  for name, g_got, g_want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g_got, g_want, atol=TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_unwritten_cache_slots_get_probability_exactly_zero(kernel):
  """Garbage in slots >= offset + L changes nothing, bit for bit, in values and gradients."""
  fn = {"reference": attn.reference_attention, "blockwise": _blockwise}[kernel]
  b, length, m, offset = 2, 3, 24, 6
  q, k, v = _rand(0, (b, length, 4, 8)), _rand(1, (b, m, 2, 8)), _rand(2, (b, m, 2, 8))
  written = (jnp.arange(m) < offset + length)[None, :, None, None]
  k_junk, v_junk = jnp.where(written, k, 1e4), jnp.where(written, v, -3e4)

  def value_and_grads(k, v):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_offset=offset) ** 2)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  (clean, clean_g), (junk, junk_g) = value_and_grads(k, v), value_and_grads(k_junk, v_junk)
  assert float(clean) == float(junk)
  for g_clean, g_junk in zip(clean_g, junk_g, strict=True):
    np.testing.assert_array_equal(g_clean, g_junk)
  assert not np.any(np.asarray(junk_g[1] * ~written)), "unwritten slots get no gradient"


def test_blockwise_query_without_visible_key_outputs_zeros():
  q, k, v = _rand(0, (2, 4, 2, 8)), _rand(1, (2, 8, 2, 8)), _rand(2, (2, 8, 2, 8))
  kv_len = jnp.array([0, 8], jnp.int32)
  for fn in (attn.reference_attention, _blockwise):
    run = lambda q, fn=fn: fn(q, k, v, kv_len=kv_len, causal=False)
    out, vjp = jax.vjp(jax.jit(run), q)
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(vjp(out)[0]))


def test_blockwise_bf16_inputs_accumulate_in_float32():
  q, k, v, kw = _inputs("prefill_gqa")
  cotangent = _rand(5, q.shape)

  def value_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * cotangent)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  _, want_grads = value_and_grads(attn.reference_attention, q, k, v)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  _, got_grads = value_and_grads(_blockwise, *low)
  out = jax.jit(lambda q, k, v: _blockwise(q, k, v, **kw))(*low)
  assert out.dtype == jnp.bfloat16 and got_grads[0].dtype == jnp.bfloat16
  # bf16 rounding of inputs, probabilities and outputs (relative 2^-8) but no bf16 accumulation
  # over keys: within a few bf16 ulps of the float32 reference (values up to ~4).
  np.testing.assert_allclose(
    out.astype(jnp.float32), attn.reference_attention(q, k, v, **kw), atol=3e-2
  )
  for g_got, g_want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g_got.astype(jnp.float32), g_want, atol=3e-2)


def test_splash_interpret_matches_reference_with_gqa_padding_and_kv_len():
  """The Pallas TPU kernel in interpreter mode (L = 150 pads to 256, kv_len via segment ids)."""
  b, length, h, g = 1, 150, 4, 2
  q, k, v = _rand(0, (b, length, h, 64)), _rand(1, (b, length, g, 64)), _rand(2, (b, length, g, 64))
  kv_len = jnp.array([120], jnp.int32)
  cotangent = _rand(3, q.shape)

  def loss(fn, **kw):
    return lambda q, k, v: jnp.sum(fn(q, k, v, kv_len=kv_len, **kw) * cotangent)

  want = jax.value_and_grad(loss(attn.reference_attention), (0, 1, 2))(q, k, v)
  got = jax.jit(
    jax.value_and_grad(loss(attn.splash_attention, block=128, interpret=True), (0, 1, 2))
  )(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-3)
  for g_got, g_want in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g_got, g_want, atol=1e-5)


def test_splash_refuses_a_traced_offset():
  q, k, v, _ = _inputs("decode_one")
  with pytest.raises(ValueError, match="static int q_offset"):
    jax.jit(lambda o: attn.splash_attention(q, k, v, q_offset=o, interpret=True))(jnp.int32(3))


def test_impl_resolution_and_errors():
  assert attn.resolve_impl("auto", length=4096, backend="cpu") == "blockwise"
  assert attn.resolve_impl("auto", length=1, backend="cpu") == "reference"
  assert attn.resolve_impl("auto", length=4096, backend="gpu") == "xla"
  assert attn.resolve_impl("auto", length=4096, backend="tpu") == "tpu_splash"
  assert attn.resolve_impl("auto", length=4096, q_offset=jnp.int32(0), backend="tpu") == "xla"
  assert attn.resolve_impl("auto", length=1, q_offset=5, backend="tpu") == "xla"
  with pytest.raises(ValueError, match="needs a TPU"):
    attn.resolve_impl("tpu_splash", length=8, backend="cpu")
  with pytest.raises(ValueError, match="unknown attention impl 'flash'.*blockwise"):
    attn.resolve_impl("flash", length=8)
  q, k, v, kw = _inputs("prefill_gqa")
  for impl in ("auto", "reference", "blockwise", "xla"):
    out = attn.attention(q, k, v, impl=impl, block_q=4, block_k=8, **kw)
    np.testing.assert_allclose(out, attn.reference_attention(q, k, v, **kw), atol=TOL)


def test_shape_errors_name_the_shapes():
  q, k, v = _rand(0, (1, 4, 3, 8)), _rand(1, (1, 4, 2, 8)), _rand(2, (1, 4, 2, 8))
  with pytest.raises(ValueError, match="query heads 3 must be a multiple of key/value heads 2"):
    attn.attention(q, k, v)
  with pytest.raises(ValueError, match=r"kv_len has shape \(3,\), want \[B\] = \[1\]"):
    attn.attention(q[:, :, :2], k, v, kv_len=jnp.ones(3, jnp.int32))


def _fwd_bwd_temp_bytes(fn, length, **kw):
  q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw)), (0, 1, 2)))
  return step.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length_reference_quadratic():
  blockwise = [_fwd_bwd_temp_bytes(attn.blockwise_attention, n) for n in (4096, 8192)]
  reference = [_fwd_bwd_temp_bytes(attn.reference_attention, n) for n in (4096, 8192)]
  assert blockwise[1] <= 2.2 * blockwise[0], blockwise
  assert reference[1] >= 3.5 * reference[0], reference
  assert blockwise[1] < reference[0] / 10, (blockwise, reference)
