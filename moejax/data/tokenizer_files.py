"""Bring-your-own tokenizer: a sentencepiece model file or a Hugging Face `tokenizer.json`.

Both are wrapped in one small interface (`vocab_size`, `eos_id`, `encode`, `encode_batch`,
`decode`), the one `moejax.data.prepare` tokenizes with and `moejax.generate` decodes with.

- `*.model`: a sentencepiece model (what `moejax.data.tokenizer` trains). Its eos piece is the
  document separator.
- `*.json`: a Hugging Face `tokenizers` file, loaded with the `tokenizers` package. Its end of
  document token is `eos_token` when given, else the first of `EOS_CANDIDATES` in its vocabulary.
  Text is encoded without added special tokens (a document is its own tokens, then eos).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from moejax.data import tokenizer as sentencepiece_lib
from moejax.data.shard_format import PreparedDataError

SENTENCEPIECE_SUFFIX = ".model"
HF_SUFFIX = ".json"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class TokenizerFileError(PreparedDataError):
  """A tokenizer file that cannot be used; the message names the file and the fix."""


class SentencePieceFile:
  """A sentencepiece model behind the common interface."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    self._tokenizer = sentencepiece_lib.Tokenizer(model_proto)
    self.vocab_size = self._tokenizer.vocab_size
    self.eos_id = self._tokenizer.eos_id
    if self.eos_id < 0:
      raise TokenizerFileError(
        "the sentencepiece model has no eos piece (documents are separated by eos): train it "
        "with eos_id set, or let prepare train one with --vocab_size"
      )

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # One thread: parallelism comes from prepare's worker processes.
    return self._tokenizer._sp.encode(list(texts), num_threads=1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(ids)


class HuggingFaceFile:
  """A Hugging Face `tokenizer.json` (through the `tokenizers` package)."""

  kind = "huggingface"

  def __init__(self, text: str, eos_token: str = "", where: str = "tokenizer.json"):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers give the parallelism
    try:
      import tokenizers
    except ImportError:
      raise TokenizerFileError(
        f"{where} is a Hugging Face tokenizer, which needs the `tokenizers` package: "
        "pip install -r requirements.txt"
      ) from None
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the Rust error type is not exported
      raise TokenizerFileError(f"{where} is not a readable tokenizer.json ({e})") from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    ids = [self._tokenizer.token_to_id(name) for name in names]
    found = [i for i in ids if i is not None]
    if not found:
      raise TokenizerFileError(
        f"{where} has no end-of-document token among {names}: name its eos token with "
        "--eos_token (it separates documents)"
      )
    self.eos_id = int(found[0])

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def from_bytes(data: bytes, name: str, eos_token: str = ""):
  """The tokenizer stored as `data` in a file called `name` (its suffix tells the kind)."""
  if name.endswith(SENTENCEPIECE_SUFFIX):
    try:
      return SentencePieceFile(data)
    except RuntimeError as e:
      raise TokenizerFileError(f"{name} is not a sentencepiece model ({e})") from None
  if name.endswith(HF_SUFFIX):
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      raise TokenizerFileError(f"{name} is not UTF-8 JSON: give a tokenizer.json") from None
    return HuggingFaceFile(text, eos_token, where=name)
  raise TokenizerFileError(
    f"tokenizer {name!r}: unknown kind; give a sentencepiece '*.model' or a Hugging Face "
    "'tokenizer.json'"
  )


def load(path: str, eos_token: str = ""):
  """Reads the tokenizer file at `path` (see the module docstring)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise TokenizerFileError(
      f"tokenizer {path!r} cannot be read ({e.strerror or e}): give an existing "
      "sentencepiece .model or tokenizer.json"
    ) from None
  return from_bytes(data, os.path.basename(path), eos_token)


def imported_tokenizer(workdir: str):
  """The tokenizer a run imported from Hugging Face came with (WORKDIR/hf/tokenizer.json, its eos
  token from hf/tokenizer_config.json), or None for any other run."""
  path = os.path.join(os.fspath(workdir), "hf", "tokenizer.json")
  if not os.path.exists(path):
    return None
  eos, config = "", os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.exists(config):
    with open(config) as f:
      token = json.load(f).get("eos_token") or ""
    eos = token.get("content", "") if isinstance(token, dict) else token
  return load(path, eos)


def sha256_of(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds every id: uint16 up to 65,536 ids, else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
