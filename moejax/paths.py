"""Work directories as `etils.epath` paths: local folders or bucket URLs, never confused.

Everything moejax writes into a workdir (checkpoints, config.json, metrics, tokenizer, token
cache) goes through `epath.Path`, so a `gs://bucket/run` workdir is a bucket, not a local folder
named "gs:". epath reaches buckets through fsspec backends (gcsfs for gs://, s3fs for s3://);
when the backend is missing, `workdir` refuses the URL with one line before anything runs.
Checkpoint arrays are written by Orbax/TensorStore, which reads gs:// natively.
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from etils import epath

from moejax import errors

# URL scheme -> the Python package epath needs to reach it.
BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def backend_available(package: str) -> bool:
  return importlib.util.find_spec(package) is not None


def resolve(path) -> epath.Path:
  """`path` as an epath.Path: an absolute local path, or a URL whose backend is installed.

  Raises:
    errors.ConfigError: an unknown URL scheme, or one whose backend package is missing.
  """
  text = os.fspath(path)
  if not is_url(text):
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme = text.split("://", 1)[0]
  if scheme not in BACKENDS:
    raise errors.ConfigError(
      f"{text!r}: moejax reads and writes local folders and {', '.join(BACKENDS)}:// URLs, not "
      f"{scheme}://; use a local path or a supported bucket"
    )
  if not backend_available(BACKENDS[scheme]):
    raise errors.ConfigError(
      f"{text!r}: {scheme}:// paths need the {BACKENDS[scheme]} package (pip install "
      f"{BACKENDS[scheme]}); install it, or use a local path"
    )
  return epath.Path(text)


def workdir(path) -> epath.Path:
  """Resolves a run directory, creates it if needed and proves it writable (a probe file).

  Raises:
    errors.ConfigError: empty, a file, a URL that cannot be reached, or not writable.
  """
  if not os.fspath(path):
    raise errors.ConfigError("--workdir is empty: give a directory for logs and checkpoints")
  directory = resolve(path)
  if directory.exists() and not directory.is_dir():
    raise errors.ConfigError(
      f"--workdir {os.fspath(path)!r} is a file, not a directory; choose a directory path"
    )
  probe = directory / f".write-probe-{uuid.uuid4().hex}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise errors.ConfigError(
      f"--workdir {os.fspath(path)!r} is not writable ({e.strerror or e}); choose a directory "
      "you can write to, or fix its permissions"
    ) from None
  return directory


def write_atomically(path: epath.Path, data: bytes | str) -> None:
  """Writes `data` to a unique temporary file beside `path`, then renames it into place."""
  temp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
  if isinstance(data, str):
    temp.write_text(data)
  else:
    temp.write_bytes(data)
  temp.replace(path)
