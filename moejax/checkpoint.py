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
  tries the steps newest first; once one reads, the newer unreadable ones are reported with the
  reason and moved to checkpoints/unreadable/ (kept for inspection, never deleted). When none
  reads, nothing is moved and the error lists why.
- A checkpoint whose array shapes do not match the config is a user error, not damage:
  `check_compatible` raises `IncompatibleCheckpointError` naming the differing config keys and
  touches nothing.
- A failed write (e.g. disk full) raises `CheckpointWriteError` naming the step and the last
  committed one, which stays intact.
"""

from __future__ import annotations

import json
import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

UNREADABLE_DIR = "unreadable"


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of another model; the message names the differing keys."""


class CheckpointReadError(OSError):
  """No checkpoint of the workdir can be read; nothing was moved or deleted."""


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed (e.g. disk full); the previous checkpoint is intact."""


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, say=print):
    """(step, state, data_state) of the newest readable step, or None when there is none.

    Unreadable steps newer than the one restored are reported through `say` and moved aside.
    When no step can be read, nothing is moved and `CheckpointReadError` lists the reasons:
    a failure of every step is more likely a changed setup (mesh, memory) than damage.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any failure to read means: try an older step
        failures.append((step, _first_line(e)))
        continue
      for bad, reason in failures:
        say(f"moejax: checkpoint step {bad} is unreadable ({reason}); falling back to step {step}")
        self._move_aside(bad)
      return (step, *restored)
    if failures:
      reasons = "; ".join(f"step {s}: {r}" for s, r in failures)
      raise CheckpointReadError(
        f"no checkpoint in {self.directory!r} can be read ({reasons}); nothing was changed. "
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
      f"workdir {os.path.dirname(self.directory)!r} holds a checkpoint (step {step}) from an "
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
      f"saving checkpoint step {step} in {self.directory!r} failed ({_first_line(e)}); {last}. "
      "Free disk space (or fix the path) and rerun the same command to resume"
    )

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = os.path.join(self.directory, UNREADABLE_DIR, f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.replace(src, target)
      logging.warning("Moved unreadable checkpoint %s to %s", src, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"moejax_move_aside_{step}")
    self.manager.reload()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` carrying the given shardings (a matching pytree)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


# -------------------------------------------------------------------- config.json


def write_config(workdir: str, config: dict) -> None:
  """Writes WORKDIR/config.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(config, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
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
