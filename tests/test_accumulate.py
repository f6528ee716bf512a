"""Gradient accumulation (moejax.ops.accumulate): N microbatches equal one N-times-larger batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import accumulate


def _params():
  rng = np.random.default_rng(0)
  return {
    "w_in": jnp.asarray(0.3 * rng.standard_normal((6, 16)), jnp.float32),
    "w_out": jnp.asarray(0.3 * rng.standard_normal((16, 3)), jnp.float32),
    "gate": jnp.asarray(0.3 * rng.standard_normal((6, 4)), jnp.float32),
  }


def _batch(size=12):
  rng = np.random.default_rng(1)
  return {
    "x": jnp.asarray(rng.standard_normal((size, 5, 6)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, (size, 5)), jnp.int32),
  }


def _mlp_loss(params, batch, balance_weight=0.1):
  """Token cross-entropy of a 2-layer MLP plus two router-like aux losses: a z-loss (a token
  mean, like the cross-entropy) and a Switch-like balance loss (a nonlinear function of
  batch-mean statistics, so the big batch's value is not the mean of microbatch values)."""
  h = jax.nn.gelu(batch["x"] @ params["w_in"])
  logp = jax.nn.log_softmax(h @ params["w_out"])
  ce = -jnp.mean(jnp.take_along_axis(logp, batch["y"][..., None], axis=-1))
  gate_logits = batch["x"] @ params["gate"]
  z_loss = jnp.mean(jax.nn.logsumexp(gate_logits, axis=-1) ** 2)
  balance = 4 * jnp.sum(jnp.mean(jax.nn.softmax(gate_logits), axis=(0, 1)) ** 2)
  loss = ce + 0.1 * z_loss + balance_weight * balance
  return loss, {"cross_entropy": ce, "z_loss": z_loss, "balance_loss": balance}


def _mean(trees):
  return jax.tree.map(lambda *x: sum(x) / len(x), *trees)


@pytest.mark.parametrize("microbatches", [1, 2, 3, 4])
def test_microbatches_average_losses_metrics_and_grads(microbatches):
  params, batch = _params(), _batch()
  run = jax.jit(
    lambda p, b: accumulate.accumulate_gradients(_mlp_loss, p, b, microbatches=microbatches)
  )
  loss, aux, grads = run(params, batch)
  size = batch["x"].shape[0] // microbatches
  parts = [
    jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(microbatches)
  ]
  per_part = [jax.value_and_grad(_mlp_loss, has_aux=True)(params, part) for part in parts]
  np.testing.assert_allclose(loss, _mean([loss for (loss, _), _ in per_part]), rtol=1e-5)
  for name in aux:
    want = _mean([a[name] for (_, a), _ in per_part])
    np.testing.assert_allclose(aux[name], want, rtol=1e-5, err_msg=name)
  for name in grads:
    want = _mean([g[name] for _, g in per_part])
    np.testing.assert_allclose(grads[name], want, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("microbatches", [2, 3, 4])
def test_token_mean_losses_equal_one_big_batch(microbatches):
  """Cross-entropy and z-loss (token means, equal tokens per microbatch): loss, metrics and
  gradients of N microbatches equal those of the N-times-larger batch."""
  params, batch = _params(), _batch()
  token_mean_loss = lambda p, b: _mlp_loss(p, b, balance_weight=0.0)
  loss, aux, grads = jax.jit(
    lambda p, b: accumulate.accumulate_gradients(token_mean_loss, p, b, microbatches=microbatches)
  )(params, batch)
  (big_loss, big_aux), big_grads = jax.value_and_grad(token_mean_loss, has_aux=True)(params, batch)
  np.testing.assert_allclose(loss, big_loss, rtol=1e-5)
  for name in ("cross_entropy", "z_loss"):
    np.testing.assert_allclose(aux[name], big_aux[name], rtol=1e-5, err_msg=name)
  for name in grads:
    np.testing.assert_allclose(grads[name], big_grads[name], atol=1e-5, err_msg=name)
  # The batch-statistic balance loss is averaged over microbatches, not the big batch's value.
  assert abs(float(aux["balance_loss"]) - float(big_aux["balance_loss"])) > 1e-6


def test_rng_is_folded_per_microbatch_and_grads_keep_param_dtype():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  batch = _batch(4)

  def noisy_loss(p, b, rng):
    noise = jax.random.normal(rng, ())
    return jnp.sum(p["w_out"].astype(jnp.float32)) * noise, {"noise": noise}

  rng = jax.random.key(7)
  loss, aux, grads = accumulate.accumulate_gradients(
    noisy_loss, params, batch, microbatches=2, rng=rng
  )
  noises = [jax.random.normal(jax.random.fold_in(rng, i), ()) for i in range(2)]
  np.testing.assert_allclose(aux["noise"], (noises[0] + noises[1]) / 2, rtol=1e-6)
  assert grads["w_out"].dtype == jnp.bfloat16 and loss.dtype == jnp.float32


def test_indivisible_batch_raises_before_tracing_the_loss():
  message = r"batch leading size \(12,\) is not divisible by microbatches=5"
  with pytest.raises(ValueError, match=message):
    accumulate.accumulate_gradients(_mlp_loss, _params(), _batch(), microbatches=5)
  with pytest.raises(ValueError, match="microbatches must be >= 1, got 0"):
    accumulate.accumulate_gradients(_mlp_loss, _params(), _batch(), microbatches=0)
