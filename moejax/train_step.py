"""The pure training and evaluation steps over split NNX state (jitted by the caller).

`TrainState` is a plain pytree of arrays, so it is jitted with explicit shardings, checkpointed by
Orbax and restored onto any mesh. The model is rebuilt inside the step with `nnx.merge` (free at
trace time); `nnx.jit` is never used in the hot loop (it costs far more Python per call).

Loss: the model returns its final hidden states and the cross-entropy is taken in chunks of
`loss_chunk` tokens (moejax.ops.losses), never building the float32 [B, L, V] logits; a batch of
at most `loss_chunk` tokens (or loss_chunk 0) computes the full logits at once.

Gradient accumulation (`microbatches` N > 1, moejax.ops.accumulate): the batch runs as N
microbatches in a scan; losses, aux losses, metrics and gradients are the means over microbatches
(for token-mean losses and per-group router losses this equals the big batch). Every microbatch
starts from the step's model state, so it routes exactly as the big batch would; non-parameter
state a router updates in the forward pass (DeepSeek's balance bias) becomes the mean of the
microbatches' updated states (for DeepSeek: b + rate * mean_i sign(error_i), which is the big
batch's update whenever the microbatches agree on an expert's sign, and moves b by at most `rate`
per step). Router noise: microbatch i folds i into the step's key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax import faults
from moejax.ops import accumulate, aux_losses, losses


def new_train_state(params, model_state, optimizer: optax.GradientTransformation, seed: int):
  """Args: pure dicts of parameter arrays and of the other model variables."""
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "model_state": model_state,
    "opt_state": optimizer.init(params),
    "rng": jax.random.key_data(jax.random.key(seed)),
  }


def cross_entropy(logits_blv, targets_bl):
  """Mean token cross-entropy in nats (float32)."""
  logp = jax.nn.log_softmax(logits_blv.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_bl[..., None], axis=-1)[..., 0]
  return jnp.mean(nll)


def token_loss(model, hidden_bld, targets_bl, loss_chunk: int):
  """Mean token cross-entropy from the model's final hidden states [B, L, D]."""
  if loss_chunk and targets_bl.size > loss_chunk:
    return losses.chunked_cross_entropy(
      hidden_bld, model.unembed[...], targets_bl, chunk=loss_chunk
    )
  return cross_entropy(model.logits(hidden_bld), targets_bl)


def make_train_step(
  graphdef,
  optimizer: optax.GradientTransformation,
  aux_loss_weights: Mapping[str, float],
  schedule: optax.Schedule,
  nonfinite_policy: str = "halt",
  poison_step: int | None = None,
  consistency: tuple[int, float] = (1, 0.0),
  *,
  loss_chunk: int = 0,
  microbatches: int = 1,
  batch_shards: int = 1,
):
  """Returns `step(state, batch) -> (state, metrics)`, a pure function to wrap in jax.jit.

  `aux_loss_weights` are the router family's (`routers.loss_weights`); the loss is the
  cross-entropy plus weight * loss for every auxiliary loss the model returns.
  `metrics[faults.NONFINITE_KEY]` counts the non-finite metric entries of the step; under
  `nonfinite_policy='skip'` such a step leaves params, optimizer and model state unchanged
  (only `step` advances, so the data order is unchanged). `poison_step` is a test hook that
  makes the loss of that 1-based step NaN. `consistency` = (passes, weight): with 2 passes
  (THOR-style routers, `routers.consistency`) the model runs twice with different router keys
  (one forward vmapped over both keys, so the weight gradients are reduced once),
  the cross-entropy is the sum of both passes' and `weight` times the symmetric KL of the two
  passes' output distributions is added (`consistency_loss` in the metrics).
  `loss_chunk`: tokens per cross-entropy chunk (0 = full logits); `microbatches`: gradient
  accumulation (module docstring); `batch_shards`: devices the batch axis is split over, so each
  microbatch takes its rows from every device.
  """
  passes, consistency_weight = consistency
  base_weights = dict(aux_loss_weights)
  if passes not in (1, 2):
    raise ValueError(f"{passes=}: a train step runs the model once or twice")

  def forward(params, model_state, inputs, rng, *, return_hidden=False):
    """(logits or hidden states, aux, the model state the pass leaves, the model) of one pass."""
    model = nnx.merge(graphdef, params, model_state)
    out, aux = model(inputs, train=True, rng=rng, return_hidden=return_hidden)
    # Non-parameter variables a module updated during the forward pass (e.g. a load-balancing
    # bias updated by a rule instead of a gradient) leave the step through the new state.
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return out, aux, nnx.to_pure_dict(new_model_state), model

  def two_passes(params, model_state, inputs, rng):
    """Both passes as one vmapped forward over the two keys (rng, fold_in(rng, 1)): the weight
    gradients of the passes are then one contraction, summed over the batch devices once
    instead of once per pass. Both passes start from `model_state`; metrics and new state are
    the first pass's. Returns (logits of pass 1, of pass 2, aux, new state)."""
    keys = jnp.stack([jax.random.key_data(rng), jax.random.key_data(jax.random.fold_in(rng, 1))])
    run = lambda key: forward(params, model_state, inputs, jax.random.wrap_key_data(key))[:3]
    logits, aux, new_state = jax.vmap(run)(keys)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)
    return logits[0], logits[1], first(aux), first(new_state)

  def loss_fn(params, model_state, batch, rng, step):
    if passes == 2:  # the symmetric KL needs both passes' full logits
      logits, second, aux, new_model_state = two_passes(params, model_state, batch["inputs"], rng)
      ce = faults.poison(cross_entropy(logits, batch["targets"]), step, poison_step)
      ce = ce + cross_entropy(second, batch["targets"])
      consistency_loss = aux_losses.symmetric_kl(logits, second)
      aux["losses"]["consistency_loss"] = consistency_loss
      aux_loss_weights = {**base_weights, "consistency_loss": consistency_weight}
    else:
      hidden, aux, new_model_state, model = forward(
        params, model_state, batch["inputs"], rng, return_hidden=True
      )
      ce = token_loss(model, hidden, batch["targets"], loss_chunk)
      ce = faults.poison(ce, step, poison_step)
      aux_loss_weights = base_weights
    total = ce
    for name, value in aux["losses"].items():
      total = total + aux_loss_weights.get(name, 0.0) * value
    metrics = {"loss": total, "cross_entropy": ce, **aux["losses"], **aux["metrics"]}
    return total, (metrics, new_model_state)

  def gradients(state, batch, rng):
    """(grads, metrics, new model state) of the whole batch, by microbatches when N > 1."""
    if microbatches == 1:
      grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
        state["params"], state["model_state"], batch, rng, state["step"]
      )
      return grads, metrics, model_state
    micro = lambda params, part, key: loss_fn(
      params, state["model_state"], part, key, state["step"]
    )
    _, (metrics, model_state), grads = accumulate.accumulate_gradients(
      micro, state["params"], batch, microbatches=microbatches, rng=rng, shards=batch_shards
    )
    # The mean of the microbatches' updated states, in the state's own dtypes.
    model_state = jax.tree.map(
      lambda new, old: new.astype(old.dtype), model_state, state["model_state"]
    )
    return grads, metrics, model_state

  def step(state: dict[str, Any], batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics, model_state = gradients(state, batch, rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state["step"])
    metrics[faults.NONFINITE_KEY] = faults.count_nonfinite(metrics)
    new_state = {
      **state,
      "step": state["step"] + 1,
      "params": params,
      "model_state": model_state,
      "opt_state": opt_state,
    }
    if nonfinite_policy == "skip":
      ok = metrics[faults.NONFINITE_KEY] == 0
      new_state = {**faults.keep_if_finite(ok, new_state, state), "step": new_state["step"]}
    return new_state, metrics

  return step


def make_eval_step(graphdef, loss_chunk: int = 0):
  """Returns `eval_step(params, model_state, batch) -> (summed token NLL, token count, metrics)`.

  Pure; `metrics` are the model's per-layer router metrics (evaluation mode: no router noise,
  the eval capacity factor). `loss_chunk` as in `make_train_step`.
  """

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    hidden, aux = model(batch["inputs"], train=False, return_hidden=True)
    targets = batch["targets"]
    if loss_chunk and targets.size > loss_chunk:
      nll, count = losses.chunked_nll_sum(hidden, model.unembed[...], targets, chunk=loss_chunk)
      return nll, count, aux["metrics"]
    count = targets.size
    nll = cross_entropy(model.logits(hidden), targets) * count
    return nll, jnp.asarray(count, jnp.float32), aux["metrics"]

  return eval_step
