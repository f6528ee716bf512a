"""Orbax checkpoints of the train state together with the data-iterator state.

Layout: WORKDIR/checkpoints/<step>/{state, data}, plus WORKDIR/config.json (the config of the
last run, to name the keys that differ when a checkpoint no longer fits). Saving is
asynchronous (training continues while the arrays are written); `wait` blocks until the last
save has committed.

Crash safety (what Orbax gives, and what is added here):
- Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when every file is
  written, so a crash mid-save leaves a temporary directory that is never listed as a step;
  `cleanup_tmp_directories` removes it at the next start. Old steps beyond `keep` are deleted
  only after the newer save has committed (CheckpointManager._finalize).
- A committed step can still be damaged later (truncated or deleted files). `restore_latest`
  tries the steps newest first; once one reads, the newer damaged ones are reported with the
  reason and moved to checkpoints/unreadable/ (kept for inspection, never deleted). Only errors
  that mean the bytes are bad (missing or truncated files, undecodable data) count as damage,
  and every host must have read the step without any other error: an out-of-memory, a
  permission or network error stops the run with the step untouched. When no step reads,
  nothing is moved and the error lists why.
- A checkpoint whose array shapes do not match the config is a user error, not damage:
  `check_compatible` raises `IncompatibleCheckpointError` naming the differing config keys and
  touches nothing.
- A failed write (e.g. disk full) raises `CheckpointWriteError` naming the step and the last
  committed one, which stays intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from moejax import errors, paths

UNREADABLE_DIR = "unreadable"
# Text (lower case) of the errors Orbax / TensorStore raise for bytes that are missing or malformed.
_DAMAGE_MARKERS = (
  "data_loss",
  "not_found",
  "not found",
  "out_of_range",
  "error opening",
  "error reading",
  "unexpected end",
  "no such file",
  "does not exist",
  "expecting value",
  "decode",
  "corrupt",
  "truncat",
)
_OK, _DAMAGED, _FAILED = 0, 1, 2


class IncompatibleCheckpointError(errors.CheckpointError):
  """The workdir holds a checkpoint of another model; the message names the differing keys."""


class CheckpointReadError(errors.CheckpointError):
  """No checkpoint of the workdir can be read; nothing was moved or deleted."""


class CheckpointWriteError(errors.CheckpointError):
  """Writing a checkpoint failed (e.g. disk full); the previous checkpoint is intact."""


def is_damage(error: BaseException) -> bool:
  """Whether a restore error means the checkpoint's bytes are bad (not memory, not access)."""
  if isinstance(error, FileNotFoundError | json.JSONDecodeError | EOFError):
    return True
  if isinstance(error, MemoryError | PermissionError):
    return False
  text = str(error).lower()
  if any(m in text for m in ("resource_exhausted", "out of memory", "permission", "unavailable")):
    return False
  return any(marker in text for marker in _DAMAGE_MARKERS)


def _agree(status: int) -> np.ndarray:
  """Every host's restore status of one step (hosts read their own shards)."""
  if jax.process_count() == 1:
    return np.asarray([status])
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.int32(status)))


class Checkpointer:
  def __init__(self, workdir, *, keep: int, async_save: bool = True):
    self.directory = paths.resolve(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
      ),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving `state` (pytree of global arrays) and the JSON-able `data_state`."""
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
      )
    except OSError as e:  # an async save's error surfaces at the next save or wait
      raise self._write_error(step, e) from e

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    The target shardings may belong to a different mesh than the one that saved.
    """
    with _reads_finish_before_loop_closes():
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, say=print):
    """(step, state, data_state) of the newest readable step, or None when there is none.

    Damaged steps newer than the one restored are reported through `say` and moved aside. An
    error that is not damage (on any host) is raised with nothing moved. When no step can be
    read, nothing is moved and `CheckpointReadError` lists the reasons: a failure of every step
    is more likely a changed setup (mesh, memory) than damage.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        restored = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - classified below: damage, or raised
        error = e
      local = _OK if error is None else (_DAMAGED if is_damage(error) else _FAILED)
      statuses = _agree(local)
      if (statuses == _FAILED).any():
        if error is not None and local == _FAILED:
          raise error
        raise errors.CheckpointError(
          f"checkpoint step {step} in {self.directory} failed to load on another host (see its "
          "log); nothing was moved. Fix that host's problem and rerun"
        )
      if (statuses == _DAMAGED).any():
        reason = _first_line(error) if error is not None else "unreadable on another host"
        damaged.append((step, reason))
        continue
      for bad, reason in damaged:
        say(f"moejax: checkpoint step {bad} is unreadable ({reason}); falling back to step {step}")
        self._move_aside(bad)
      return (step, *restored)
    if damaged:
      reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise CheckpointReadError(
        f"no checkpoint in {str(self.directory)!r} can be read ({reasons}); nothing was changed. "
        "If the mesh or machine changed, go back to it; to start afresh use a new --workdir"
      )
    return None

  def check_compatible(self, abstract_state, saved_config: dict | None, config: dict) -> None:
    """Raises IncompatibleCheckpointError when the newest checkpoint's arrays do not fit.

    Reads only the small metadata file; an unreadable one is left to `restore_latest`.
    """
    step = self.latest_step()
    if step is None:
      return
    try:
      meta = self.manager.item_metadata(step)["state"]
      saved = {_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(meta)}
    except Exception:  # noqa: BLE001 - damaged metadata is handled as damage, later
      return
    wanted = {
      _path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)
    }
    if saved == wanted or None in saved.values():  # unknown shapes = damage, not a config change
      return
    # Only model and optimizer keys shape the state; other changes (train.steps) are allowed.
    diff = _config_diff(saved_config, config) if saved_config else []
    diff = [d for d in diff if d.startswith(("model.", "optim."))]
    if saved_config and not diff:
      return  # same config, other arrays: the metadata is damaged; restore_latest handles it
    arrays = sorted(set(saved) ^ set(wanted)) or [k for k in wanted if saved[k] != wanted[k]]
    shown = arrays[0] + (f" {saved.get(arrays[0])} vs {wanted.get(arrays[0])}")
    keys = "; ".join(diff[:8]) if diff else "none found in WORKDIR/config.json"
    raise IncompatibleCheckpointError(
      f"workdir {str(self.directory.parent)!r} holds a checkpoint (step {step}) from an "
      f"incompatible config (differing keys: {keys}; first mismatched array {shown}); use a new "
      "--workdir, or set those keys back to resume"
    )

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      raise self._write_error(self.latest_step(), e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _write_error(self, step, e: OSError) -> CheckpointWriteError:
    committed = [s for s in self.manager.all_steps() if s != step]
    last = f"step {max(committed)} is intact" if committed else "no earlier checkpoint exists"
    return CheckpointWriteError(
      f"saving checkpoint step {step} in {str(self.directory)!r} failed ({_first_line(e)}); "
      f"{last}. Free disk space (or fix the path) and rerun the same command to resume"
    )

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = self.directory / UNREADABLE_DIR / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      src = self.directory / str(step)
      if src.exists():
        src.rename(target)
      logging.warning("Moved unreadable checkpoint %s to %s", src, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"moejax_move_aside_{step}")
    self.manager.reload()


class _FinishingEventLoop(asyncio.SelectorEventLoop):
  """An event loop whose `close` first lets its pending tasks finish.

  Orbax runs a restore in a fresh loop and closes it as soon as the gather of the array reads
  raises. The other reads of that gather are still pending then; when their TensorStore reads
  complete, or the garbage collector closes them, they call into the closed loop ("Event loop
  is closed", unraisable exceptions), and until then they hold their buffers.
  """

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _FinishingLoopPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _FinishingEventLoop


@contextlib.contextmanager
def _reads_finish_before_loop_closes():
  """Event loops made inside (Orbax makes one per restore) finish their tasks before closing."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_FinishingLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying the given shardings (a matching pytree)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


# -------------------------------------------------------------------- config.json


def write_config(workdir, config: dict) -> None:
  """Writes WORKDIR/config.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  paths.write_atomically(
    paths.resolve(workdir) / "config.json", json.dumps(config, indent=1, sort_keys=True)
  )


def read_config(workdir) -> dict | None:
  path = paths.resolve(workdir) / "config.json"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """'key saved -> current' for every leaf that differs (model keys first)."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k} {a!r} -> {b!r}")
  return sorted(out, key=lambda s: not s.startswith("model."))


def _path(p) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
