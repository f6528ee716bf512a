"""Input files of `moejax.data.prepare`: which exist, how they split into shards, their documents.

Formats (the extension decides):
- `.txt`: one document per file.
- `.jsonl`: one document per line, the string `field` of each JSON object; splittable at any
  byte offset (a range owns the lines that start inside it), so one huge file still gives many
  shards that workers tokenize in parallel.
- `.jsonl.gz`: the same, gzip-compressed; not splittable (one file = one piece).
- `.parquet`: the string column `field`; splits at row-group boundaries.

`plan_shards` turns globs into shards: lists of `Piece`s (a file, or a byte / row-group range of
one) of about `shard_bytes` input bytes each, in sorted path order. The plan depends only on the
files (paths, sizes, row groups) and `shard_bytes`, never on the number of workers, so an
interrupted prepare that is rerun finds the same shards.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Iterator

from moejax.data.shard_format import PreparedDataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class InputError(PreparedDataError):
  """Unusable input files; the message names the file (and line or row) and the fix."""


@dataclasses.dataclass(frozen=True)
class Piece:
  """A file or part of one.

  Attributes:
    path: the file.
    start, stop: byte range for .jsonl, row-group range for .parquet, (0, size) otherwise.
  """

  path: str
  start: int
  stop: int

  def to_json(self) -> list:
    return [self.path, self.start, self.stop]


def expand_globs(spec: str) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated absolute paths of supported files."""
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise InputError(f"--source {spec!r} is empty: give comma-separated globs of input files")
  paths: list[str] = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    matches = [os.path.abspath(p) for p in matches if os.path.isfile(p)]
    if not matches:
      raise InputError(f"--source glob {pattern!r} matches no file (cwd {os.getcwd()!r})")
    for path in matches:
      if not path.endswith(SUFFIXES):
        raise InputError(
          f"input {path!r} has an unsupported extension; prepare reads {', '.join(SUFFIXES)}: "
          "narrow the glob, e.g. 'dir/*.jsonl'"
        )
      if path not in paths:
        paths.append(path)
  return paths


def plan_shards(paths: list[str], field: str, shard_bytes: int) -> list[list[Piece]]:
  """Groups the inputs into shards of about `shard_bytes` input bytes (see module docstring).

  Also checks, before any work, that the first record of every .jsonl(.gz) / .parquet file has
  the string `field`.
  """
  if shard_bytes < 1:
    raise InputError(f"--shard_bytes={shard_bytes}: must be >= 1")
  pieces: list[tuple[Piece, int]] = []  # (piece, input bytes)
  for path in paths:
    size = os.path.getsize(path)
    if path.endswith(".parquet"):
      pieces += _parquet_pieces(path, field, shard_bytes)
      continue
    if path.endswith((".jsonl", ".jsonl.gz")):
      _check_first_record(path, field)
    if path.endswith(".jsonl") and size > shard_bytes:
      cuts = list(range(0, size, shard_bytes)) + [size]
      pieces += [(Piece(path, a, b), b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    else:
      pieces.append((Piece(path, 0, size), size))
  shards: list[list[Piece]] = []
  current: list[Piece] = []
  current_bytes = 0
  for piece, size in pieces:
    if current and current_bytes + size > shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(piece)
    current_bytes += size
  if current:
    shards.append(current)
  return shards


def read_documents(piece: Piece, field: str) -> Iterator[str]:
  """The non-blank documents of `piece`, in file order."""
  path = piece.path
  if path.endswith(".txt"):
    with open(path, "rb") as f:
      text = _decode(f.read(), path)
    if text.strip():
      yield text
  elif path.endswith(".jsonl"):
    yield from _jsonl_range(piece, field)
  elif path.endswith(".jsonl.gz"):
    with gzip.open(path, "rb") as f:
      for number, line in enumerate(f, start=1):
        text = _record_text(line, f"{path}:{number}", field)
        if text is not None and text.strip():
          yield text
  else:
    yield from _parquet_rows(piece, field)


def _jsonl_range(piece: Piece, field: str) -> Iterator[str]:
  """Documents of the lines that start in [piece.start, piece.stop)."""
  with open(piece.path, "rb") as f:
    if piece.start > 0:
      f.seek(piece.start - 1)
      if f.read(1) != b"\n":
        f.readline()  # the line in progress belongs to the previous range
    while True:
      offset = f.tell()
      if offset >= piece.stop:
        return
      line = f.readline()
      if not line:
        return
      text = _record_text(line, f"{piece.path} (line at byte {offset})", field)
      if text is not None and text.strip():
        yield text


def _record_text(line: bytes, where: str, field: str) -> str | None:
  """The `field` of one JSON line; None for a blank line."""
  line = _decode(line, where)
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise InputError(f"{where} is not valid JSON ({e.msg}): fix or remove that line") from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    found = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
    raise InputError(
      f"{where} has no string field {field!r} (found {found}): pass --field with the name of "
      "the text field"
    )
  return record[field]


def _check_first_record(path: str, field: str) -> None:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          _record_text(line, f"{path}:{number}", field)
          return
  except (OSError, EOFError) as e:
    raise InputError(f"{path} cannot be read ({e}): a damaged or truncated file?") from None


def _parquet_pieces(path: str, field: str, shard_bytes: int) -> list[tuple[Piece, int]]:
  pq = _pyarrow_parquet()
  try:
    meta = pq.ParquetFile(path).metadata
  except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types
    raise InputError(f"{path} is not a readable parquet file ({e})") from None
  schema = meta.schema.to_arrow_schema()
  if field not in schema.names or str(schema.field(field).type) not in ("string", "large_string"):
    raise InputError(
      f"{path} has no string column {field!r} (columns {schema.names[:10]}): pass --field with "
      "the name of the text column"
    )
  pieces, start, size = [], 0, 0
  for group in range(meta.num_row_groups):
    size += meta.row_group(group).total_byte_size
    if size >= shard_bytes or group == meta.num_row_groups - 1:
      pieces.append((Piece(path, start, group + 1), size))
      start, size = group + 1, 0
  return pieces


def _parquet_rows(piece: Piece, field: str) -> Iterator[str]:
  pq = _pyarrow_parquet()
  table = pq.ParquetFile(piece.path).read_row_groups(range(piece.start, piece.stop), [field])
  for row, text in enumerate(table.column(field).to_pylist()):
    if text is None:
      raise InputError(
        f"{piece.path} row {row} of row groups [{piece.start}, {piece.stop}) has no {field!r} "
        "value (null): drop those rows or pass another --field"
      )
    if text.strip():
      yield text


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(
      f"{where} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset {e.start}): "
      "convert it to UTF-8 or leave it out of --source"
    ) from None


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise InputError("reading .parquet needs pyarrow: pip install -r requirements.txt") from None
  return pq
