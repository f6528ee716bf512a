"""Checks of user input that config_lib.validate does not cover by itself.

Called before anything is compiled or any checkpoint is opened; every failure is a
`config_lib.ConfigError` of one line naming what is wrong, the value given, and the fix. The
catalogue of bad inputs and their messages is tests/test_bad_inputs.py (docs/TROUBLESHOOTING.md
lists the same cases).

- Misspelt keys: the closest known key by `difflib` similarity is suggested.
- Types: every value must have the type of its default (an int where a float is expected is
  fine; a bool is never an int), so a string "10" fails here, not deep inside jax.
- Policies and the test hook: train.nonfinite_policy, train.debug_poison_step,
  data.decode_errors.
- The tokenizer floor: with byte fallback the vocabulary holds 256 byte pieces and 4 specials.
- The workdir: created if missing, and must be a writable directory.
"""

from __future__ import annotations

import difflib
import os
import uuid

from moejax import config_lib, faults

DECODE_POLICIES = ("fail", "skip")
MIN_VOCAB = 256 + 4  # byte-fallback pieces + unk, bos, eos, pad


def closest_keys(unknown: list[str], known: list[str]) -> str:
  """' (did you mean ...?)' for the unknown keys that have a close known key, else ''."""
  hints = []
  for key in unknown:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if match:
      hints.append(f"{key!r} -> {match[0]!r}")
  return f" (did you mean {', '.join(hints)}?)" if hints else ""


def check_types(cfg, defaults) -> None:
  """Every leaf of `cfg` has the type of the same leaf in `defaults` (ints pass as floats)."""
  for key in config_lib._keys(defaults):
    if key.startswith("mesh.rules.") or key.startswith("model.moe.aux_loss_weights."):
      want = str if key.startswith("mesh.rules.") else float
    else:
      want = type(config_lib._get(defaults, key))
    value = config_lib._get(cfg, key)
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      raise config_lib.ConfigError(
        f"{key}={value!r} has type {type(value).__name__}, expected {want.__name__}; "
        f"write it as a {want.__name__}, e.g. {key}={config_lib._get(defaults, key)!r}"
      )


def check_config(cfg) -> None:
  """The checks of this module's keys (after config_lib's own)."""
  t = cfg.train
  if t.nonfinite_policy not in faults.POLICIES:
    raise config_lib.ConfigError(
      f"train.nonfinite_policy={t.nonfinite_policy!r} is not one of: {', '.join(faults.POLICIES)}"
    )
  if t.debug_poison_step < 0:
    raise config_lib.ConfigError(
      f"train.debug_poison_step={t.debug_poison_step}: must be >= 0 (0 = off; a test hook)"
    )
  if cfg.data.decode_errors not in DECODE_POLICIES:
    raise config_lib.ConfigError(
      f"data.decode_errors={cfg.data.decode_errors!r} is not one of: {', '.join(DECODE_POLICIES)}"
    )


def check_tokenizer_vocab(cfg) -> None:
  """The sentencepiece vocabulary floor (train-time: model-only uses of a config skip it).
  Chess sources use a fixed character vocabulary, checked by moejax/data/pipeline.py instead."""
  if cfg.model.vocab_size < MIN_VOCAB and not cfg.data.source.startswith("chess:"):
    raise config_lib.ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is below the tokenizer's floor of {MIN_VOCAB} "
      "(256 byte-fallback pieces + 4 specials); use at least 512"
    )


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and proves it writable with a probe file (removed again)."""
  if not workdir:
    raise config_lib.ConfigError("--workdir is empty: give a directory for logs and checkpoints")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(
      f"--workdir {workdir!r} is a file, not a directory; choose a directory path"
    )
  probe = os.path.join(workdir, f".write-probe-{uuid.uuid4().hex}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(
      f"--workdir {workdir!r} is not writable ({e.strerror or e}); choose a directory you can "
      "write to, or fix its permissions"
    ) from None
