"""Reading a prepared corpus: checked at open, blocks cut on demand from memory-mapped shards.

Dimension letters: L sequence length, V vocabulary.

Block index space. Each shard's token stream is cut into consecutive blocks of L + 1 tokens (a
shard's remainder, under L + 1 tokens, is dropped; no block spans two shards). Block b of the
corpus is block b - offsets[s] of shard s = searchsorted(offsets, b): the only table in memory is
int64[num_shards + 1] offsets, so opening a corpus costs the same for 10^6 or 10^12 tokens.

Held-out part. With period k = round(1 / val_fraction), every k-th block (b % k == k - 1) is a
validation block and the others are training blocks. Training block t is block t + t // (k - 1);
validation block v is block v * k + k - 1: both pure arithmetic, so training can never read a
validation block, and `moejax.evaluate` finds the same held-out blocks from the run's
(seq_len, val_fraction).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from moejax.data import tokenizer_files
from moejax.data.shard_format import (
  FORMAT,
  INDEX,
  TOKEN_COUNTS,
  PreparedDataError,
  directory_of,
  read_json,
)

VERIFY_MODES = ("size", "sha256")  # what `open` checks of each shard (sha256 reads everything)
_HASH_CHUNK = 1 << 24


class PreparedCorpus:
  """A finished prepared directory, checked against its index.

  Attributes:
    directory: the directory.
    index: the parsed index.json.
    dtype: the token dtype of the shards.
    tokens_per_shard: int64[num_shards].
    tokenizer_sha256, vocab_size, eos_id: from the index (the file is checked against the hash).
  """

  def __init__(self, spec: str, *, verify: str = "size"):
    self.directory = directory = os.path.abspath(directory_of(spec))
    if verify not in VERIFY_MODES:
      raise PreparedDataError(
        f"data.prepared_verify={verify!r} is not one of: {', '.join(VERIFY_MODES)}"
      )
    path = os.path.join(directory, INDEX)
    try:
      index = read_json(path, "the index of a prepared corpus")
    except FileNotFoundError:
      raise PreparedDataError(
        f"{directory!r} has no {INDEX}: it is not a prepared corpus, or its prepare did not "
        "finish; run (or rerun, it resumes) `python -m moejax.data.prepare --out "
        f"{directory} ...`"
      ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
      found = index.get("format") if isinstance(index, dict) else type(index).__name__
      raise PreparedDataError(f"{path}: format {found!r}, expected {FORMAT!r}; prepare it again")
    self.index = index
    try:
      self.dtype = np.dtype(index["dtype"])
      tok = index["tokenizer"]
      self.tokenizer_file = os.path.join(directory, tok["file"])
      self.tokenizer_sha256, self.vocab_size = tok["sha256"], tok["vocab_size"]
      self.eos_id = tok["eos_id"]
      self.tokens_per_shard = np.asarray([s["tokens"] for s in index["shards"]], np.int64)
      for record in index["shards"]:
        missing = [k for k in ("file", "bytes", "sha256") if k not in record]
        if missing:
          raise KeyError(missing[0])
    except (KeyError, TypeError, ValueError) as e:
      raise PreparedDataError(
        f"{path} lacks or garbles the entry {e}: it was not written by moejax.data.prepare, or "
        "was edited; prepare the corpus again"
      ) from None
    self._check(verify)
    self._maps: dict[int, np.ndarray] = {}

  def _check(self, verify: str) -> None:
    """Every shard present with the size (and, for 'sha256', the hash) its index records."""
    fix = (
      "rerun the prepare command that wrote it (it redoes only missing or damaged shards), "
      "or prepare into a new directory"
    )
    where = f"the index of {self.directory!r}"
    if int(self.tokens_per_shard.sum()) != self.index["tokens"]:
      raise PreparedDataError(
        f"{where} does not match its shards: they list {int(self.tokens_per_shard.sum())} "
        f"tokens, the total says {self.index['tokens']}; {fix}"
      )
    if _file_sha256(self.tokenizer_file, where) != self.tokenizer_sha256:
      raise PreparedDataError(
        f"{self.tokenizer_file} is not the tokenizer {where} records (sha256 differs); {fix}"
      )
    for record in self.index["shards"]:
      path = os.path.join(self.directory, record["file"])
      expected = record["tokens"] * self.dtype.itemsize
      if record["bytes"] != expected:
        raise PreparedDataError(
          f"{where} does not match its shards: {record['file']} has {record['tokens']} "
          f"{self.dtype} tokens = {expected} bytes, but the index says {record['bytes']}; {fix}"
        )
      if not os.path.exists(path):
        raise PreparedDataError(f"shard {path} is missing; {fix}")
      size = os.path.getsize(path)
      if size != expected:
        state = "truncated" if size < expected else "longer than its index says"
        raise PreparedDataError(f"shard {path} is {state} ({size} of {expected} bytes); {fix}")
      if verify == "sha256" and _file_sha256(path, where) != record["sha256"]:
        raise PreparedDataError(f"shard {path} does not have the sha256 its index records; {fix}")

  @property
  def num_shards(self) -> int:
    return len(self.tokens_per_shard)

  def tokenizer(self):
    return tokenizer_files.load(self.tokenizer_file, self.index["tokenizer"].get("eos_token", ""))

  def token_counts(self) -> np.ndarray:
    """int64[V] occurrences of each id over the whole corpus (train and held-out)."""
    return np.load(os.path.join(self.directory, TOKEN_COUNTS))

  def shard_tokens(self, shard: int) -> np.ndarray:
    """The memory-mapped token array of one shard (opened on first use)."""
    tokens = self._maps.get(shard)
    if tokens is None:
      if self.tokens_per_shard[shard] == 0:
        tokens = np.zeros([0], self.dtype)
      else:
        path = os.path.join(self.directory, self.index["shards"][shard]["file"])
        tokens = np.memmap(path, dtype=self.dtype, mode="r")
      self._maps[shard] = tokens
    return tokens

  def blocks(self, seq_len: int, val_fraction: float) -> BlockSpace:
    return BlockSpace(self, seq_len, val_fraction)


class BlockSpace:
  """Blocks of L + 1 tokens of a corpus, split into train and held-out (module docstring).

  Attributes:
    num_train, num_val: how many training / validation blocks there are.
  """

  def __init__(self, corpus: PreparedCorpus, seq_len: int, val_fraction: float):
    if seq_len < 1 or not 0 < val_fraction < 1:
      raise PreparedDataError(
        f"seq_len={seq_len}, val_fraction={val_fraction}: need seq_len >= 1, 0 < val_fraction < 1"
      )
    self.corpus, self.block_len = corpus, seq_len + 1
    self.period = max(2, round(1.0 / val_fraction))
    per_shard = corpus.tokens_per_shard // self.block_len
    self.offsets = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
    total = int(self.offsets[-1])
    self.num_val = total // self.period
    self.num_train = total - self.num_val
    if self.num_train == 0 or self.num_val == 0:
      raise PreparedDataError(
        f"{corpus.directory!r} gives {self.num_train} training and {self.num_val} held-out "
        f"blocks of {seq_len}+1 tokens with val_fraction={val_fraction}: use a shorter "
        "train.seq_len, a larger data.val_fraction or more data"
      )

  def train_block(self, t: np.ndarray) -> np.ndarray:
    """Corpus block numbers of training blocks `t` (int64[n])."""
    t = np.asarray(t, np.int64)
    return t + t // (self.period - 1)

  def val_block(self, v: np.ndarray) -> np.ndarray:
    """Corpus block numbers of validation blocks `v` (int64[n])."""
    return np.asarray(v, np.int64) * self.period + self.period - 1

  def read(self, blocks: np.ndarray) -> np.ndarray:
    """int32[n, L + 1] tokens of corpus blocks `blocks` (int64[n]), in the order given."""
    blocks = np.asarray(blocks, np.int64)
    out = np.empty([len(blocks), self.block_len], np.int32)
    shards = np.searchsorted(self.offsets, blocks, side="right") - 1
    for row, (block, shard) in enumerate(zip(blocks.tolist(), shards.tolist(), strict=True)):
      start = (block - int(self.offsets[shard])) * self.block_len
      out[row] = self.corpus.shard_tokens(shard)[start : start + self.block_len]
    return out


def _file_sha256(path: str, where: str) -> str:
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
  except OSError as e:
    raise PreparedDataError(
      f"{path}, named by {where}, cannot be read ({e.strerror or e}); rerun the prepare command"
    ) from None
  return digest.hexdigest()
