"""The input pipeline: grain source -> tokenize -> pack -> split -> shuffle/batch -> shard.

Dimension letters: B batch (global), b rows of this process, L sequence length.

What a `data.source` string means is decided by its kind (`SourceKind`): the built-in kind
reads text; other kinds register under a prefix ("name:"). For text, the whole corpus is
tokenized once into one stream (documents each followed by eos), cut into
non-overlapping blocks of L + 1 tokens (inputs are a block's first L tokens, targets its last L),
and the blocks are split into train and validation by position. Training batches come from a
grain `MapDataset` over block indices: shuffled with a seed, repeated forever (each epoch with a
new permutation), batched to the global batch, and only then cut to this process's rows, so
the global batch does not depend on the number of processes and the iterator state is a single
integer that resumes to the identical next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence

import grain
import numpy as np
from etils import epath

from moejax import errors, paths
from moejax.data import mixture, shard_format, shards, sources
from moejax.data import tokenizer as tokenizer_lib

# Bounded prefetch: grain's default (500 batches) would hold gigabytes of large global batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
MIN_VOCAB = 256 + 4  # sentencepiece with byte fallback: 256 byte pieces + unk, bos, eos, pad


@dataclasses.dataclass
class Dataset:
  """A tokenized corpus ready for training.

  Attributes:
    tokenizer: the tokenizer that produced the blocks (encode, decode, eos_id, vocab_size).
    train_blocks: int32[num_train, L + 1] training blocks.
    val_blocks: int32[num_val, L + 1] held-out blocks (none shared with train).
    unigram_entropy_nats: entropy of the train token distribution; a model that ignores
      context can at best reach perplexity exp(unigram_entropy_nats).
  """

  tokenizer: object
  train_blocks: np.ndarray
  val_blocks: np.ndarray
  unigram_entropy_nats: float

  # The training-data interface (shared with data/mixture.py's PreparedData): batches are
  # global, `rows` = [r0, r1) is the slice this process holds (`process_rows`).

  def train_iterator(self, global_batch: int, seed: int, rows: tuple[int, int]):
    return train_iterator(self.train_blocks, global_batch=global_batch, seed=seed, rows=rows)

  def eval_batches(self, global_batch: int, num_batches: int, rows: tuple[int, int]) -> list:
    return eval_batches(
      self.val_blocks, global_batch=global_batch, num_batches=num_batches, rows=rows
    )

  def token_counts(self, step: int, global_batch: int) -> dict[str, float]:
    """Tokens read per source (one source here: nothing to split)."""
    del step, global_batch
    return {}


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """How the `data.source` strings of one family become training data.

  The built-in kind reads text (the embedded corpus or .txt/.jsonl globs) with a sentencepiece
  tokenizer trained in the workdir; other kinds register under a prefix ("name:") with
  `register_source`, e.g. a project with its own data format and vocabulary.

  Attributes:
    build: (source, data_cfg, *, workdir, vocab_size, seq_len) -> Dataset; data_cfg is the
      config's `data` section.
    run_tokenizer: (source, workdir) -> the tokenizer a finished run of this source used.
    encode_documents: (documents, tokenizer) -> int32 token stream (evaluation on text files).
    min_vocab_size: the smallest model.vocab_size the kind can work with.
  """

  build: Callable[..., Dataset]
  run_tokenizer: Callable[[str, str], object]
  encode_documents: Callable[[Sequence[str], object], np.ndarray]
  min_vocab_size: int = 1


_KINDS: dict[str, SourceKind] = {}


def register_source(prefix: str, kind: SourceKind) -> None:
  """Makes `data.source` strings that start with `prefix` (e.g. "chess:") use `kind`."""
  if not prefix.endswith(":"):
    raise ValueError(f"a source prefix ends with ':', got {prefix!r}")
  _KINDS[prefix] = kind


def source_kind(source: str) -> SourceKind:
  """The kind registered for `source`'s prefix, else the built-in text kind."""
  for prefix, kind in _KINDS.items():
    if source.startswith(prefix):
      return kind
  return TEXT


def check_source(source: str, *, vocab_size: int) -> None:
  """The vocabulary floor of `source`'s kind (train time: model-only uses of a config skip it)."""
  floor = source_kind(source).min_vocab_size
  if vocab_size < floor:
    raise errors.ConfigError(
      f"model.vocab_size={vocab_size} is below the tokenizer's floor of {floor} for data.source="
      f"{source!r}; use at least {max(512, floor)}"
    )


def build_dataset(data_cfg, *, workdir: str, vocab_size: int, seq_len: int):
  """The training data of the config's `data` section: `data.mixture` of prepared corpora when
  set, else `data.source` by its kind. Returns an object with `train_iterator`,
  `eval_batches`, `token_counts`, `tokenizer` and `unigram_entropy_nats` (see `Dataset`)."""
  if data_cfg.mixture.strip():
    return mixture.open_source(
      data_cfg.source,
      data_cfg.mixture,
      seq_len=seq_len,
      val_fraction=data_cfg.val_fraction,
      vocab_size=vocab_size,
      verify=data_cfg.prepared_verify,
    )
  kind = source_kind(data_cfg.source)
  return kind.build(
    data_cfg.source, data_cfg, workdir=workdir, vocab_size=vocab_size, seq_len=seq_len
  )


def run_tokenizer(data_cfg, workdir: str):
  """The tokenizer a finished run of the config's `data` section used (evaluation, generation)."""
  if data_cfg.mixture.strip():
    return mixture.run_tokenizer(data_cfg)
  return source_kind(data_cfg.source).run_tokenizer(data_cfg.source, workdir)


def process_rows(batch_sharding, global_batch: int, seq_len: int) -> tuple[int, int]:
  """The rows [r0, r1) of the global batch that this process's devices hold, read from the
  batch sharding (`addressable_devices_indices_map`), not assumed.

  Raises:
    errors.ConfigError: the rows are not one contiguous range (a mesh layout that interleaves
      processes along the batch), which `make_array_from_process_local_data` cannot take.
  """
  shape = (global_batch, seq_len)
  spans = sorted(
    {
      idx[0].indices(global_batch)[:2]
      for idx in batch_sharding.addressable_devices_indices_map(shape).values()
    }
  )
  start, stop = spans[0]
  for a, b in spans[1:]:
    if a > stop:
      raise errors.ConfigError(
        f"this process's devices hold rows {spans} of the batch, not one contiguous range: use "
        "a mesh (mesh.dcn) whose batch axes keep each process's devices together"
      )
    stop = max(stop, b)
  return start, stop


def encode_documents(source: str, documents: Sequence[str], tokenizer) -> np.ndarray:
  """Documents as the token stream a run of `source` trains on."""
  return source_kind(source).encode_documents(documents, tokenizer)


def _text_dataset(source: str, data_cfg, *, workdir: str, vocab_size: int, seq_len: int):
  """Loads, tokenizes (cached in `workdir`), packs and splits a text corpus.

  The tokenizer lives at `workdir/tokenizer.model` and the token stream at
  `workdir/tokens_<hash>.npy` (hash of the source, the documents, the field and the tokenizer),
  both written atomically, so a restart neither retrains nor re-tokenizes.
  """
  documents = sources.load_documents(
    source, jsonl_field=data_cfg.jsonl_field, decode_errors=data_cfg.decode_errors
  )
  tokenizer = tokenizer_lib.load_or_train(
    epath.Path(workdir) / "tokenizer.model", documents, vocab_size
  )
  digest = hashlib.sha256()
  for part in (source, data_cfg.jsonl_field, str(vocab_size)):
    digest.update(part.encode("utf-8") + b"\0")
  digest.update(tokenizer.model_proto)
  for document in documents:
    digest.update(document.encode("utf-8") + b"\0")
  cache_path = epath.Path(workdir) / f"tokens_{digest.hexdigest()[:16]}.npy"
  if cache_path.exists():
    with cache_path.open("rb") as f:
      tokens = np.load(f)
    logging.info("Loaded %d cached tokens from %s.", tokens.size, cache_path)
  else:
    start = time.perf_counter()
    tokens = tokenize_documents(documents, tokenizer)
    logging.info(
      "Tokenized %d documents (%d characters) into %d tokens in %.2f s.",
      len(documents),
      sum(len(d) for d in documents),
      tokens.size,
      time.perf_counter() - start,
    )
    _save_atomically(cache_path, tokens)
  return split_dataset(tokenizer, pack_blocks(tokens, seq_len), data_cfg.val_fraction)


def split_dataset(tokenizer, blocks: np.ndarray, val_fraction: float) -> Dataset:
  """A Dataset of `blocks` split by `split_blocks`, with its unigram entropy (logged)."""
  train_blocks, val_blocks = split_blocks(blocks, val_fraction)
  entropy = unigram_entropy(train_blocks)
  logging.info(
    "Data: %d train and %d val blocks of %d+1 tokens; unigram entropy %.3f nats "
    "(context-free perplexity %.1f).",
    len(train_blocks),
    len(val_blocks),
    blocks.shape[1] - 1,
    entropy,
    np.exp(entropy),
  )
  return Dataset(tokenizer, train_blocks, val_blocks, entropy)


def _sentencepiece_tokenizer(source: str, workdir: str):
  """The sentencepiece model a text run wrote to WORKDIR/tokenizer.model."""
  del source
  path = epath.Path(workdir) / "tokenizer.model"
  if not path.exists():
    raise errors.DataError(
      f"{path} not found: give the workdir of a moejax.train run (it writes the tokenizer there)"
    )
  return tokenizer_lib.Tokenizer(path.read_bytes())


def tokenize_documents(documents: Sequence[str], tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  """One int32 token stream: every document's tokens followed by eos, in document order."""
  eos_id = tokenizer.eos_id

  def encode(document: str) -> np.ndarray:
    ids = tokenizer.encode(document)
    ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)

  # sentencepiece releases the GIL while encoding, so threads tokenize in parallel.
  threads = max(1, min(os.cpu_count() or 1, 16))
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  encoded = grain.MapDataset.source(documents).map(encode).to_iter_dataset(read_options)
  parts = list(encoded)
  return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def pack_blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts the stream into consecutive, non-overlapping int32[num_blocks, seq_len + 1] blocks.

  The remainder (fewer than seq_len + 1 tokens) is dropped.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  tokens = np.asarray(tokens, dtype=np.int32)
  num_blocks = tokens.size // (seq_len + 1)
  return tokens[: num_blocks * (seq_len + 1)].reshape(num_blocks, seq_len + 1)


def split_blocks(blocks: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits blocks into (train, val): every round(1 / val_fraction)-th block is validation.

  The held-out blocks are spread evenly over the whole corpus, so both sides come from the same
  distribution, and no block is on both sides.
  """
  if not 0.0 < val_fraction < 1.0:
    raise errors.DataError(
      f"data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.05 to hold out 1 block in 20."
    )
  period = max(1, round(1.0 / val_fraction))
  is_val = np.arange(len(blocks)) % period == period - 1
  train_blocks, val_blocks = blocks[~is_val], blocks[is_val]
  if len(train_blocks) == 0 or len(val_blocks) == 0:
    raise errors.DataError(
      f"splitting {len(blocks)} blocks of {blocks.shape[1]} tokens with "
      f"val_fraction={val_fraction} leaves {len(train_blocks)} train and {len(val_blocks)} val "
      "blocks: use a smaller train.seq_len, more data, or a val_fraction that keeps both sides."
    )
  return train_blocks, val_blocks


def train_iterator(
  train_blocks: np.ndarray,
  *,
  global_batch: int,
  seed: int,
  rows: tuple[int, int] | None = None,
) -> grain.DatasetIterator:
  """An endless iterator of rows [r0, r1) of shuffled global training batches.

  Each element is {"inputs": int32[b, L], "targets": int32[b, L]} with b = r1 - r0 (default:
  all B rows); concatenating the processes' rows gives the single-process batch, whatever the
  number of processes. Each epoch is a new permutation; a batch can straddle two epochs.
  `get_state()` is a JSON-serialisable dict and `set_state(state)` resumes at the identical next
  batch.
  """
  r0, r1 = mixture.check_rows(rows, global_batch)
  if len(train_blocks) < global_batch:
    logging.warning(
      "Only %d train blocks for a global batch of %d: blocks repeat within a batch.",
      len(train_blocks),
      global_batch,
    )
  dataset = (
    grain.MapDataset.source(range(len(train_blocks)))
    .shuffle(seed=seed)
    .repeat(None)
    .batch(global_batch, drop_remainder=True)  # int[B] block indices
    .map(lambda indices: _inputs_and_targets(train_blocks[indices[r0:r1]]))
  )
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
  val_blocks: np.ndarray,
  *,
  global_batch: int,
  num_batches: int,
  rows: tuple[int, int] | None = None,
) -> list[dict[str, np.ndarray]]:
  """The first min(num_batches, available) full validation batches, rows [r0, r1) of each.

  Deterministic (blocks in order, no shuffling); same rows as `train_iterator`.
  """
  r0, r1 = mixture.check_rows(rows, global_batch)
  available = len(val_blocks) // global_batch
  if available == 0 or num_batches < 1:
    raise errors.DataError(
      f"{len(val_blocks)} validation blocks do not make one full batch of global_batch="
      f"{global_batch} (num_batches={num_batches}): raise data.val_fraction, lower the "
      "eval batch size or train.seq_len, or use more data."
    )
  return [
    _inputs_and_targets(val_blocks[i * global_batch + r0 : i * global_batch + r1])
    for i in range(min(num_batches, available))
  ]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the token frequency distribution of `tokens` (any shape)."""
  counts = np.bincount(np.asarray(tokens).ravel())
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())


def _inputs_and_targets(blocks: np.ndarray) -> dict[str, np.ndarray]:
  """int32[b, L + 1] blocks -> inputs = block[:, :-1], targets = block[:, 1:]."""
  return {
    "inputs": np.ascontiguousarray(blocks[:, :-1], dtype=np.int32),
    "targets": np.ascontiguousarray(blocks[:, 1:], dtype=np.int32),
  }


def _save_atomically(path: epath.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.save(buffer, array)
  paths.write_atomically(path, buffer.getvalue())


def _prepared_dataset(source: str, data_cfg, *, workdir: str, vocab_size: int, seq_len: int):
  del workdir  # the corpus carries its tokenizer
  return mixture.open_source(
    source,
    seq_len=seq_len,
    val_fraction=data_cfg.val_fraction,
    vocab_size=vocab_size,
    verify=data_cfg.prepared_verify,
  )


PREPARED = SourceKind(  # `prepared:DIR`: a directory written by `python -m moejax.data.prepare`
  build=_prepared_dataset,
  run_tokenizer=lambda source, workdir: shards.PreparedCorpus(source).tokenizer(),
  encode_documents=lambda documents, tokenizer: tokenize_documents(documents, tokenizer),
)
register_source(shard_format.PREFIX, PREPARED)

TEXT = SourceKind(
  build=_text_dataset,
  run_tokenizer=_sentencepiece_tokenizer,
  encode_documents=lambda documents, tokenizer: tokenize_documents(documents, tokenizer),
  min_vocab_size=MIN_VOCAB,
)
