"""Faults a long run must survive: preemption signals and non-finite numbers.

Design choices:
- Preemption. SIGTERM / SIGINT only set a flag; the loop checks it after each step (a Python
  bool, no device sync), saves a checkpoint of the step reached, waits for it to commit and
  returns; the CLI then prints one line and exits 0. A second signal exits at once
  (`os._exit(128 + signum)`): an interrupted async save leaves only an Orbax temporary
  directory, which is never read as a checkpoint. With several processes the step to stop at
  must be the same on every host: JAX's preemption service (`jax.distributed`, on by default)
  catches SIGTERM itself and `multihost_utils.reached_preemption_sync_point(step)` turns true
  on all hosts at the same step, so no Python handler is installed there (a local Ctrl-C stays
  a KeyboardInterrupt: stopping one host alone would hang the others in a collective).
- Non-finite numbers. The jitted step counts non-finite scalars among the loss, the gradient
  norm and every auxiliary loss / router metric (all computed from the router logits, so a
  non-finite logit shows up) and, under policy `skip`, selects the old state with `jnp.where`.
  The host looks at those counts only where it already syncs: at log intervals and before a
  checkpoint is written. Under `halt` that check raises `NonFiniteError` naming the first bad
  step and metrics before anything poisoned is saved.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("halt", "skip")
NONFINITE_KEY = "nonfinite_count"  # metric: non-finite scalars seen in this step
SKIPPED_KEY = "skipped_steps"  # logged: steps whose update was not applied, since the start


class NonFiniteError(RuntimeError):
  """Training produced a non-finite metric under train.nonfinite_policy='halt'."""


# ------------------------------------------------------------------ inside the jitted step


def count_nonfinite(metrics: dict) -> jax.Array:
  """int32 scalar: how many entries of the floating metrics (scalars or vectors) are not finite."""
  counts = [
    jnp.sum(~jnp.isfinite(v)).astype(jnp.int32)
    for v in metrics.values()
    if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
  ]
  return sum(counts, jnp.zeros((), jnp.int32))


def keep_if_finite(ok: jax.Array, new_state, old_state):
  """`new_state` where `ok` (bool scalar), else `old_state`, leaf by leaf (no host sync)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, old_state)


def poison(value: jax.Array, step: jax.Array, poison_step: int | None) -> jax.Array:
  """Test hook (train.debug_poison_step): `value` times NaN at 1-based step `poison_step`.

  A product (not a select) so that the gradients of that step are NaN too. None: no poison.
  """
  if poison_step is None:
    return value
  return value * jnp.where(step + 1 == poison_step, jnp.nan, 1.0)


# ------------------------------------------------------------------ on the host


class NonFiniteMonitor:
  """Collects each step's device metrics and inspects them only when `check` is called."""

  def __init__(self, policy: str):
    self.policy = policy
    self.skipped = 0
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    """Remembers the (device) metrics of 1-based `step`; nothing is transferred."""
    self._pending.append((step, metrics))

  def check(self) -> int:
    """Fetches the pending counts (one transfer); returns the total of skipped steps.

    Raises:
      NonFiniteError: under 'halt', naming the first bad step and its non-finite metrics.
    """
    pending, self._pending = self._pending, []
    if not pending:
      return self.skipped
    counts = jax.device_get([m[NONFINITE_KEY] for _, m in pending])
    bad = [(step, m) for (step, m), c in zip(pending, counts, strict=True) if int(c) > 0]
    if bad and self.policy == "halt":
      step, metrics = bad[0]
      values = jax.device_get({k: v for k, v in metrics.items() if k != NONFINITE_KEY})
      names = [k for k, v in values.items() if not np.all(np.isfinite(np.asarray(v, float)))]
      raise NonFiniteError(
        f"non-finite {', '.join(names)} at step {step} (loss {float(values['loss'])}) under "
        "train.nonfinite_policy='halt'; no checkpoint was written after it. Lower "
        "optim.learning_rate, raise optim.warmup_steps, or set train.nonfinite_policy='skip'"
      )
    self.skipped += len(bad)
    return self.skipped


class StopSignal:
  """Turns SIGTERM / SIGINT into a request to stop after the current step (see module doc)."""

  def __init__(self, multiprocess: bool | None = None):
    self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
    self.received: str | None = None
    self._previous = {}

  def __enter__(self) -> StopSignal:
    for signum in [] if self.multiprocess else [signal.SIGINT, signal.SIGTERM]:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: signals stay with whoever owns them
        pass
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      print(f"moejax: second {name}: exiting now without waiting for the checkpoint", flush=True)
      sys.stdout.flush()
      os._exit(128 + signum)
    self.received = name

  def should_stop(self, step: int) -> bool:
    """True when this step is the one to save and stop at (the same step on every host)."""
    if self.multiprocess:
      from jax.experimental import multihost_utils

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = self.received or "preemption notice"
          return True
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service)
        pass
      return False
    return self.received is not None
