"""The on-disk format of a prepared corpus (written by `prepare`, read by `shards`).

A prepared directory holds:
- `shard_NNNNN.bin`: the token ids of one shard, raw little-endian uint16 (vocabularies up to
  65,536) or uint32: the documents of the shard, each followed by the eos id, back to back.
- `shard_NNNNN.json`: the shard's record {file, tokens, documents, bytes, sha256}, written after
  its .bin: a shard is finished when its record exists and the .bin has `bytes` bytes.
- `shard_NNNNN.counts.npy`: int64[V] how often each id occurs in the shard.
- `tokenizer.model` (sentencepiece) or `tokenizer.json` (Hugging Face): the tokenizer.
- `token_counts.npy`: int64[V], the sum of the shards' counts (the unigram baseline).
- `index.json`: written last, so it exists only for a finished corpus: format, the settings
  that produced it (inputs, tokenizer, shard size), the tokenizer's file / sha256 / vocab size /
  eos id, the dtype, totals and the list of shard records.

Why raw token arrays and not ArrayRecord: training reads fixed-length blocks cut from the
concatenated token stream, and a flat array makes a block one slice of a memory map (no record
decoding, no per-block table); opening the corpus reads only the index, so start-up time and
memory do not grow with the corpus; and the files are trivially checked (size, sha256) and read by
any tool (numpy.memmap). grain still drives the order (shuffle, repeat) and the iterator state.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import uuid

from moejax import errors

FORMAT = "moejax.prepared/1"
INDEX = "index.json"
TOKEN_COUNTS = "token_counts.npy"
PREFIX = "prepared:"


class PreparedDataError(errors.DataError):
  """A prepared corpus (or a mixture of them) that cannot be used; names the file and the fix."""


def shard_file(i: int) -> str:
  return f"shard_{i:05d}.bin"


def record_file(i: int) -> str:
  return f"shard_{i:05d}.json"


def counts_file(i: int) -> str:
  return f"shard_{i:05d}.counts.npy"


def temporary_path(path: str) -> str:
  return f"{path}.tmp-{uuid.uuid4().hex}"


def write_bytes_atomically(path: str, data: bytes) -> None:
  temp = temporary_path(path)
  with open(temp, "wb") as f:
    f.write(data)
  os.replace(temp, path)


def write_json_atomically(path: str, value) -> None:
  write_bytes_atomically(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str, what: str):
  """The JSON at `path`, or PreparedDataError naming `what` it should have been."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as e:
    raise PreparedDataError(
      f"{path} ({what}) cannot be read ({e}): rerun the prepare command that wrote it"
    ) from None


def directory_of(spec: str) -> str:
  """'prepared:DIR' -> DIR (a bare DIR is returned as it is); a URL is refused."""
  directory = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
  if "://" in directory:  # shards are memory-mapped, which needs a file system path
    raise PreparedDataError(
      f"{spec!r}: prepared corpora are read from local or mounted folders (the shards are "
      "memory-mapped); copy the corpus to local disk or mount the bucket (e.g. gcsfuse)"
    )
  return directory
