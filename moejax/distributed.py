"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`).

Every host runs the same program; one process per host (or per GPU) owns that host's devices and
`jax.distributed.initialize` joins them into one set of global devices. Which arguments to pass
is decided here, in this order (the first that applies wins):

1. explicit config (`distributed.coordinator_address`, `.num_processes`, `.process_id`; all three
   or none) -- what `launch/local_multiprocess.sh` passes, and the escape hatch anywhere else;
2. a Cloud TPU VM (pod slice): JAX reads the worker list from the TPU environment, no arguments;
3. a Slurm job step with more than one task: JAX derives the coordinator (first node of the step),
   the task count and this task's rank from the SLURM_* variables;
4. nothing: one process over its local devices (jax.distributed is not started).

Failure handling is the runtime's: processes wait `initialization_timeout_s` for each other at
start, and a peer whose heartbeats stop for `heartbeat_timeout_s` makes every other process abort
(exit status 134, SIGABRT) with JAX's message naming the lost task ("The following tasks are
unhealthy (stopped sending heartbeats): 1", or "the leader task ... died" when process 0 is the
lost one). Nothing here can turn that into a Python exception: the abort comes from the runtime's
own thread, so we print, before joining, which process this is and how long it will wait.

Writing: only process 0 writes logs, TensorBoard and the tokenizer (`is_writer`, `writer_first`);
every process takes part in Orbax checkpointing, which coordinates itself.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax

from moejax.errors import ConfigError

T = TypeVar("T")

_SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the others.

  Attributes:
    method: "config", "tpu", "slurm" or "single".
    kwargs: the arguments for `jax.distributed.initialize` (empty for "single").
    description: one line for the log.
  """

  method: str
  kwargs: dict
  description: str


def plan(dist_cfg, environ: Mapping[str, str] | None = None, on_tpu: bool | None = None) -> Plan:
  """Decides how to start (pure: reads only `dist_cfg`, `environ` and `on_tpu`).

  Args:
    dist_cfg: the config's `distributed` section.
    environ: environment variables (default os.environ).
    on_tpu: whether this is a Cloud TPU VM (default: TPU pod variables, or libtpu + chips).

  Raises:
    ConfigError: a partial or inconsistent explicit setting, or bad timeouts.
  """
  environ = os.environ if environ is None else environ
  timeouts = _timeouts(dist_cfg)
  address, count, index = dist_cfg.coordinator_address, dist_cfg.num_processes, dist_cfg.process_id
  given = {
    "distributed.coordinator_address": bool(address),
    "distributed.num_processes": count is not None,
    "distributed.process_id": index is not None,
  }
  if any(given.values()):
    missing = [k for k, v in given.items() if not v]
    if missing:
      raise ConfigError(
        f"{missing} not set while {[k for k, v in given.items() if v]} are: give all three "
        "(coordinator host:port, number of processes, this process's id) or none to detect them"
      )
    if ":" not in address:
      raise ConfigError(
        f"distributed.coordinator_address={address!r} needs a port, e.g. '10.0.0.2:1234'"
      )
    if count < 1 or not 0 <= index < count:
      raise ConfigError(
        f"distributed.process_id={index} must be in 0..{count - 1} "
        f"(distributed.num_processes={count})"
      )
    kwargs = dict(coordinator_address=address, num_processes=count, process_id=index)
    return Plan("config", {**kwargs, **timeouts}, f"process {index} of {count} via {address}")
  if _detect_tpu(environ) if on_tpu is None else on_tpu:
    return Plan("tpu", dict(timeouts), "Cloud TPU VM: workers from the TPU environment")
  if all(v in environ for v in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    n, rank = int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
    desc = f"Slurm job {environ['SLURM_JOB_ID']}: task {rank} of {n}"
    kwargs = {"cluster_detection_method": "slurm", **timeouts}
    # JAX gives a Slurm task one GPU (number SLURM_LOCALID); one task per node takes them all.
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", n)))
    if n == nodes and environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
      kwargs["local_device_ids"] = list(range(int(environ["SLURM_GPUS_ON_NODE"])))
    return Plan("slurm", kwargs, desc)
  return Plan("single", {}, "single process")


def initialize(dist_cfg, environ: Mapping[str, str] | None = None) -> Plan:
  """Starts `jax.distributed` as `plan` decides; call before anything else uses jax.

  Every process prints a line before joining (so one that waits for a missing peer says so) and
  one with its process index and device counts after.
  """
  p = plan(dist_cfg, environ)
  if p.method == "single" or jax.distributed.is_initialized():
    return p
  # CPU devices of several processes talk through gloo; GPU/TPU collectives are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  print(
    f"moejax: joining {p.description} ({p.method}); waiting up to "
    f"{dist_cfg.initialization_timeout_s} s for all processes; a peer silent for "
    f"{dist_cfg.heartbeat_timeout_s} s stops every process",
    flush=True,
  )
  jax.distributed.initialize(**p.kwargs)
  print(
    f"moejax: process {jax.process_index()} of {jax.process_count()}: "
    f"{jax.local_device_count()} local of {jax.device_count()} global devices",
    flush=True,
  )
  return p


def is_writer() -> bool:
  """Whether this process writes logs, TensorBoard and the tokenizer (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def writer_first(name: str, fn: Callable[[], T]) -> T:
  """Runs `fn` on process 0, then (after a barrier) on the others; returns its result.

  For work that writes a cache every process then reads (tokenizer, token stream): process 0
  writes it, the others find it and only load. On hosts that do not share the file system the
  others redo the (deterministic) work themselves.
  """
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_writer() else None
  barrier(f"moejax:{name}")
  return result if is_writer() else fn()


def _timeouts(dist_cfg) -> dict:
  init_s, beat_s = int(dist_cfg.initialization_timeout_s), int(dist_cfg.heartbeat_timeout_s)
  for key, value in (("initialization_timeout_s", init_s), ("heartbeat_timeout_s", beat_s)):
    if value < 1:
      raise ConfigError(f"distributed.{key}={value}: must be >= 1 second")
  return dict(initialization_timeout=init_s, heartbeat_timeout_seconds=beat_s)


def _detect_tpu(environ: Mapping[str, str]) -> bool:
  """A TPU pod's variables, or libtpu installed with TPU chips attached (/dev/accel*, vfio)."""
  if any(v in environ for v in _TPU_VARS):
    return True
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None
