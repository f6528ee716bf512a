r"""Prepare a corpus once: tokenize input files in parallel into sharded token arrays + an index.

  python -m moejax.data.prepare --source 'corpus/*.jsonl.gz,more/*.parquet' --out DIR \
      (--tokenizer tokenizer.model|tokenizer.json | --vocab_size 32000) [--workers 8] \
      [--field text] [--shard_bytes 268435456] [--eos_token '</s>']

Then train with `--config.data.source=prepared:DIR` (or several in `data.mixture`).

- Inputs: .txt (a document per file), .jsonl / .jsonl.gz (a document per line, `--field`),
  .parquet (column `--field`); sorted by path and cut into shards of about `--shard_bytes` input
  bytes (moejax/data/readers.py). The format of DIR: moejax/data/shard_format.py.
- Tokenizer: `--tokenizer` brings a sentencepiece model or a Hugging Face tokenizer.json
  (copied into DIR); `--vocab_size N` trains a sentencepiece BPE model on an evenly spread
  sample of the inputs (about 20 M characters).
- Parallel: `--workers` processes each tokenize and write whole shards.
- Resumable and reproducible: a shard is written to a temporary file and renamed, then its
  record is written; a rerun skips every shard with a record and a .bin of the recorded size, so
  an interrupted prepare (crash, kill, Ctrl-C) resumes where it was and gives byte-identical
  shards. A directory that holds another corpus (other inputs or settings) is refused, never
  written over.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

from moejax.data import readers, tokenizer_files
from moejax.data import tokenizer as sentencepiece_lib
from moejax.data.shard_format import (
  FORMAT,
  INDEX,
  TOKEN_COUNTS,
  PreparedDataError,
  counts_file,
  read_json,
  record_file,
  shard_file,
  temporary_path,
  write_bytes_atomically,
  write_json_atomically,
)

SETTINGS = "settings.json"  # what an unfinished prepare is preparing (the rerun must match)
DEFAULT_SHARD_BYTES = 256 * 2**20
SAMPLE_CHARS = 20_000_000  # sentencepiece training sample for --vocab_size
_BATCH_CHARS = 1 << 20  # documents tokenized per encode_batch call


class PrepareInterrupted(RuntimeError):
  """Raised by the `stop_after_shards` test hook, as a crash would stop a prepare."""


def prepare(
  source: str,
  out: str,
  *,
  tokenizer: str = "",
  vocab_size: int = 0,
  workers: int = 1,
  field: str = "text",
  shard_bytes: int = DEFAULT_SHARD_BYTES,
  eos_token: str = "",
  stop_after_shards: int | None = None,
  log=print,
) -> dict:
  """Prepares `source` into `out` (see the module docstring); returns the index plus timings.

  Args:
    stop_after_shards: test hook: raise PrepareInterrupted once this many shards are written.

  Raises:
    PreparedDataError: bad inputs, tokenizer or arguments, or `out` holds another corpus.
  """
  if bool(tokenizer) == bool(vocab_size):
    raise PreparedDataError(
      "give exactly one of --tokenizer PATH (a sentencepiece .model or tokenizer.json) and "
      "--vocab_size N (train a sentencepiece model on the inputs)"
    )
  if workers < 1:
    raise PreparedDataError(f"--workers={workers}: must be >= 1")
  paths = readers.expand_globs(source)
  plan = readers.plan_shards(paths, field, shard_bytes)
  given = tokenizer_files.load(tokenizer, eos_token) if tokenizer else None
  settings = {
    "format": FORMAT,
    "inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths],
    "field": field,
    "shard_bytes": shard_bytes,
    "tokenizer": _tokenizer_setting(tokenizer, vocab_size, eos_token),
  }
  os.makedirs(out, exist_ok=True)
  _claim(out, settings)
  for stale in glob.glob(os.path.join(out, "*.tmp-*")):  # left by a killed run
    os.remove(stale)
  name, data = _tokenizer_file(out, tokenizer, vocab_size, given, plan, field, log)
  tok = tokenizer_files.from_bytes(data, name, eos_token)

  todo = [i for i in range(len(plan)) if not _is_finished(out, i)]
  log(f"prepare: {len(plan)} shards, {len(plan) - len(todo)} already done, {workers} workers")
  start, cpu_start, new_tokens = time.perf_counter(), _cpu_seconds(), 0
  tasks = [(out, i, [p.to_json() for p in plan[i]], field) for i in todo]
  with _worker_pool(workers, name, data, eos_token) as pool:
    results = pool.imap_unordered(_work, tasks) if pool else map(_work, tasks)
    for done, record in enumerate(results, start=1):
      new_tokens += record["tokens"]
      log(f"prepare: {record['file']} {record['tokens']} tokens ({done}/{len(todo)})")
      if stop_after_shards is not None and done >= stop_after_shards:
        raise PrepareInterrupted(f"stopped after {done} shards (test hook)")
  seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start

  index = write_index(out, len(plan), settings, name, data, tok)
  rate = new_tokens / seconds if seconds > 0 and new_tokens else 0.0
  log(
    f"prepare: {out}: {index['tokens']} tokens, {index['documents']} documents, "
    f"{len(plan)} shards; tokenized {new_tokens} tokens in {seconds:.1f} s ({rate:.0f} tokens/s)"
  )
  return {**index, "new_tokens": new_tokens, "seconds": seconds, "cpu_seconds": cpu_seconds}


def write_shard(out: str, i: int, pieces: list[readers.Piece], field: str, tok) -> dict:
  """Tokenizes the documents of `pieces` into shard `i` of `out`; returns its record."""

  def documents_as_ids():
    documents = (readers.read_documents(p, field) for p in pieces)
    for batch in _batches(itertools.chain.from_iterable(documents)):
      ids = tok.encode_batch(batch)
      lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
      flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=int(lengths.sum()))
      yield np.insert(flat, np.cumsum(lengths), tok.eos_id), len(batch)  # eos after each

  inputs = [p.to_json() for p in pieces]
  return write_shard_tokens(out, i, documents_as_ids(), tok.vocab_size, inputs)


def write_shard_tokens(out: str, i: int, chunks, vocab_size: int, inputs: list) -> dict:
  """Writes shard `i` of `out` from `chunks` of (int64[n] ids, documents in them); its record.

  Writes .bin, then .counts.npy, then the record (the done marker), each atomically.
  """
  dtype = tokenizer_files.token_dtype(vocab_size)
  path = os.path.join(out, shard_file(i))
  temp = temporary_path(path)
  digest, counts = hashlib.sha256(), np.zeros([vocab_size], np.int64)
  tokens = documents = 0
  with open(temp, "wb") as f:
    for ids, num_documents in chunks:
      if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise PreparedDataError(
          f"the tokenizer produced id {int(ids.max())} outside its vocabulary of {vocab_size}: "
          "a broken tokenizer file"
        )
      raw = ids.astype(dtype).tobytes()
      f.write(raw)
      digest.update(raw)
      counts += np.bincount(ids, minlength=vocab_size)
      tokens, documents = tokens + ids.size, documents + num_documents
  os.replace(temp, path)
  _save_npy(os.path.join(out, counts_file(i)), counts)
  record = {
    "file": shard_file(i),
    "tokens": tokens,
    "documents": documents,
    "bytes": tokens * dtype.itemsize,
    "sha256": digest.hexdigest(),
    "inputs": inputs,
  }
  write_json_atomically(os.path.join(out, record_file(i)), record)
  return record


def write_index(out: str, num_shards: int, settings: dict, name: str, data: bytes, tok) -> dict:
  """Sums the shards' counts into token_counts.npy, then writes index.json (the commit point)."""
  records = [read_json(os.path.join(out, record_file(i)), "a record") for i in range(num_shards)]
  counts = np.zeros([tok.vocab_size], np.int64)
  for i in range(num_shards):
    counts += np.load(os.path.join(out, counts_file(i)))
  _save_npy(os.path.join(out, TOKEN_COUNTS), counts)
  index = {
    "format": FORMAT,
    "settings": settings,
    "tokenizer": {
      "file": name,
      "kind": tok.kind,
      "sha256": tokenizer_files.sha256_of(data),
      "vocab_size": tok.vocab_size,
      "eos_id": tok.eos_id,
      "eos_token": settings["tokenizer"].get("eos_token", ""),
    },
    "dtype": tokenizer_files.token_dtype(tok.vocab_size).name,
    "tokens": sum(r["tokens"] for r in records),
    "documents": sum(r["documents"] for r in records),
    "shards": records,
  }
  write_json_atomically(os.path.join(out, INDEX), index)
  if os.path.exists(os.path.join(out, SETTINGS)):
    os.remove(os.path.join(out, SETTINGS))
  return index


def _claim(out: str, settings: dict) -> None:
  """Refuses a directory that holds (or is preparing) a corpus of other settings."""
  for name in (INDEX, SETTINGS):
    path = os.path.join(out, name)
    if os.path.exists(path):
      found = read_json(path, "prepare settings")
      found = found.get("settings") if name == INDEX and isinstance(found, dict) else found
      if found != settings:
        differ = sorted(
          k for k in settings if not isinstance(found, dict) or found.get(k) != settings[k]
        )
        raise PreparedDataError(
          f"--out {out!r} already holds a prepared corpus (or an unfinished prepare) of other "
          f"inputs or settings (differing: {', '.join(differ)}); nothing was changed: use a new "
          "--out, or delete that directory to prepare it again"
        )
      return
  if any(not n.startswith(".") for n in os.listdir(out)):
    raise PreparedDataError(
      f"--out {out!r} is a non-empty directory that is not a prepared corpus; nothing was "
      "changed: give a new or empty directory"
    )
  write_json_atomically(os.path.join(out, SETTINGS), settings)


def _tokenizer_setting(path: str, vocab_size: int, eos_token: str) -> dict:
  if not path:
    return {"train_sentencepiece_vocab_size": vocab_size}
  with open(path, "rb") as f:
    return {
      "name": os.path.basename(path),
      "sha256": tokenizer_files.sha256_of(f.read()),
      "eos_token": eos_token,
    }


def _tokenizer_file(out, path, vocab_size, given, plan, field, log) -> tuple[str, bytes]:
  """(file name in `out`, bytes) of the tokenizer: copied, reused, or trained on a sample."""
  if given is not None:
    name = "tokenizer" + (
      tokenizer_files.SENTENCEPIECE_SUFFIX
      if given.kind == "sentencepiece"
      else tokenizer_files.HF_SUFFIX
    )
    with open(path, "rb") as f:
      data = f.read()
    write_bytes_atomically(os.path.join(out, name), data)
    return name, data
  name = "tokenizer" + tokenizer_files.SENTENCEPIECE_SUFFIX
  target = os.path.join(out, name)
  if not os.path.exists(target):
    log(f"prepare: training a sentencepiece tokenizer (vocab {vocab_size}) on a sample")
    sample = _sample_documents(plan, field)
  else:
    sample = []
  tok = sentencepiece_lib.load_or_train(target, sample, vocab_size)
  return name, tok.model_proto


def _sample_documents(plan, field: str) -> list[str]:
  """Documents from up to 16 shards spread evenly over the plan, about SAMPLE_CHARS in all."""
  chosen = plan[:: max(1, -(-len(plan) // 16))]
  budget, sample = SAMPLE_CHARS // len(chosen), []
  for pieces in chosen:
    taken = 0
    for document in itertools.chain.from_iterable(readers.read_documents(p, field) for p in pieces):
      sample.append(document)
      taken += len(document)
      if taken >= budget:
        break
  return sample


def _is_finished(out: str, i: int) -> bool:
  path = os.path.join(out, record_file(i))
  if not os.path.exists(path) or not os.path.exists(os.path.join(out, counts_file(i))):
    return False
  record = read_json(path, "a shard record")
  bin_path = os.path.join(out, shard_file(i))
  return os.path.exists(bin_path) and os.path.getsize(bin_path) == record["bytes"]


def _batches(documents, max_chars: int = _BATCH_CHARS):
  batch, chars = [], 0
  for document in documents:
    batch.append(document)
    chars += len(document)
    if chars >= max_chars:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (the joined workers)."""
  own, children = (
    resource.getrusage(resource.RUSAGE_SELF),
    resource.getrusage(resource.RUSAGE_CHILDREN),
  )
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _save_npy(path: str, array: np.ndarray) -> None:
  temp = temporary_path(path)
  with open(temp, "wb") as f:
    np.save(f, array)
  os.replace(temp, path)


# Worker processes: the tokenizer is sent once (initializer), the tasks are shard numbers.
_WORKER_TOKENIZER = None


def _init_worker(name: str, data: bytes, eos_token: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizer_files.from_bytes(data, name, eos_token)


def _work(task) -> dict:
  out, i, pieces, field = task
  return write_shard(out, i, [readers.Piece(*p) for p in pieces], field, _WORKER_TOKENIZER)


class _worker_pool:
  """A spawn pool of `workers` processes, or (1 worker) None: tokenize in this process."""

  def __init__(self, workers: int, name: str, data: bytes, eos_token: str):
    self.args = (workers, name, data, eos_token)
    self.pool = None

  def __enter__(self):
    workers, name, data, eos_token = self.args
    _init_worker(name, data, eos_token)
    if workers > 1:  # spawn: never fork a process that may hold threads (grain, jax)
      context = multiprocessing.get_context("spawn")
      self.pool = context.Pool(workers, initializer=_init_worker, initargs=(name, data, eos_token))
    return self.pool

  def __exit__(self, *exc):
    if self.pool is not None:
      self.pool.terminate()  # on an error, do not wait for the other shards
      self.pool.join()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m moejax.data.prepare", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--source", required=True, help="comma-separated globs of input files")
  parser.add_argument("--out", required=True, help="the prepared directory to write")
  parser.add_argument("--tokenizer", default="", help="a sentencepiece .model or tokenizer.json")
  parser.add_argument("--vocab_size", type=int, default=0, help="train a sentencepiece model")
  parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
  parser.add_argument("--field", default="text", help="text field of .jsonl / .parquet records")
  parser.add_argument(
    "--shard_bytes", type=int, default=DEFAULT_SHARD_BYTES, help="input bytes per shard"
  )
  parser.add_argument("--eos_token", default="", help="tokenizer.json: the end-of-document token")
  args = parser.parse_args(argv)
  try:
    options = vars(args)
    return prepare(options.pop("source"), options.pop("out"), **options)
  except (PreparedDataError, ValueError, OSError) as e:
    if os.environ.get("MOEJAX_TRACEBACK"):
      raise
    print(f"moejax: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
