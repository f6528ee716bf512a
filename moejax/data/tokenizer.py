"""A sentencepiece tokenizer, trained in-process on the corpus on first use and cached.

Training choices, all for exact and reproducible text <-> ids:
- `byte_fallback=True`: a character outside the vocabulary becomes its UTF-8 bytes, so there is
  no `<unk>` and `decode(encode(text)) == text` for any text (emoji and newlines included).
- `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`: the text is not
  NFKC-normalised and runs of spaces are kept.
- `add_dummy_prefix=False`: a document is encoded whole, so a word after a newline carries no
  leading space; training sentences (lines) are treated the same way.
- ids: unk 0, bos 1, eos 2, pad 3. BPE by default (fast to train: ~0.7 s single-threaded for
  the 5 MB Shakespeare corpus). The trainer is deterministic and runs with one thread (the
  thread count is stored in the model), so every process and machine writes identical bytes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence

import sentencepiece as spm
from etils import epath

from moejax import errors, paths

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece silently drops training sentences over 4192 bytes: longer lines are split.
_MAX_LINE_BYTES = 4000
# Above this many characters, training uses an evenly spaced subset of the lines.
_MAX_TRAIN_CHARS = 20_000_000


class Tokenizer:
  """Text <-> token ids through a sentencepiece model.

  Attributes:
    vocab_size: number of pieces (ids are in [0, vocab_size)).
    eos_id, bos_id, pad_id: ids of the special pieces.
  """

  def __init__(self, model_proto: bytes):
    """Builds the tokenizer from the bytes of a serialized sentencepiece model."""
    self._model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)

  @classmethod
  def from_file(cls, path) -> Tokenizer:
    return cls(epath.Path(path).read_bytes())

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (a list or a 1-D integer array); special pieces decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self) -> dict:
    return {"model_proto": self._model_proto}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"])


def load_or_train(
  path, documents: Sequence[str], vocab_size: int, *, model_type: str = "bpe"
) -> Tokenizer:
  """Loads the tokenizer at `path`, or trains one on `documents` and writes it there.

  Args:
    path: model file, e.g. WORKDIR/tokenizer.model. Written atomically (temp file + rename), so
      a crash never leaves a half-written model and a restart reuses the finished one.
    documents: the training corpus (only read when `path` does not exist).
    vocab_size: the number of pieces wanted; a cached model of another size is an error.
    model_type: sentencepiece model type, "bpe" or "unigram".

  Raises:
    errors.ConfigError: the cached model has another vocab size, or sentencepiece cannot train a
      model of `vocab_size` pieces on `documents`.
  """
  path = epath.Path(path)
  if path.exists():
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size != vocab_size:
      raise errors.ConfigError(
        f"the tokenizer cached at {path!r} has vocab size {tokenizer.vocab_size}, but "
        f"model.vocab_size={vocab_size}: use a new workdir, or set "
        f"model.vocab_size={tokenizer.vocab_size} to reuse it."
      )
    logging.info("Loaded tokenizer %s (vocab %d).", path, vocab_size)
    return tokenizer
  tokenizer = train_in_memory(documents, vocab_size, model_type=model_type)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_atomically(path, tokenizer.model_proto)
  logging.info("Wrote tokenizer %s.", path)
  return tokenizer


def train_in_memory(
  documents: Sequence[str], vocab_size: int, *, model_type: str = "bpe"
) -> Tokenizer:
  """Trains a sentencepiece model on `documents` without touching the file system."""
  start = time.perf_counter()
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(documents),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      pad_id=PAD_ID,
      num_threads=1,  # Stored in the model: a fixed value keeps its bytes machine-independent.
      minloglevel=2,
    )
  except RuntimeError as e:
    reason = str(e).split("] ", 1)[-1].strip()
    raise errors.ConfigError(
      f"sentencepiece cannot train a {model_type} tokenizer with model.vocab_size={vocab_size} "
      f"on {len(documents)} documents: {reason} Choose a vocab size in the range it allows, "
      "or use more data."
    ) from None
  logging.info(
    "Trained a %s tokenizer (vocab %d) in %.2f s.",
    model_type,
    vocab_size,
    time.perf_counter() - start,
  )
  return Tokenizer(model.getvalue())


def _training_lines(documents: Sequence[str]) -> Iterator[str]:
  """The non-blank lines of the documents (an even subset if huge), long ones split."""
  lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
  total_chars = sum(len(line) for line in lines)
  stride = max(1, -(-total_chars // _MAX_TRAIN_CHARS))
  for line in lines[::stride]:
    yield from _split_long_line(line)


def _split_long_line(line: str) -> Iterator[str]:
  """Splits `line` at spaces (or anywhere, for a huge word) into pieces of <= _MAX_LINE_BYTES."""
  if len(line.encode("utf-8")) <= _MAX_LINE_BYTES:
    yield line
    return
  piece, piece_bytes = [], 0
  for word in line.split(" "):
    word_bytes = len(word.encode("utf-8")) + 1
    if piece and piece_bytes + word_bytes > _MAX_LINE_BYTES:
      yield " ".join(piece)
      piece, piece_bytes = [], 0
    while word_bytes > _MAX_LINE_BYTES:  # One word longer than a line: cut by characters.
      cut = _MAX_LINE_BYTES // 4  # A character is at most 4 bytes.
      yield word[:cut]
      word = word[cut:]
      word_bytes = len(word.encode("utf-8")) + 1
    piece.append(word)
    piece_bytes += word_bytes
  if piece:
    yield " ".join(piece)
