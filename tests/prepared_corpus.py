"""Test corpora for prepared data whose tokens tell where they came from.

A Hugging Face word-level tokenizer maps the word "k" to id k (k < size), "</s>" to `size`
(eos) and "<unk>" to size + 1. Documents are runs of consecutive numbers, so every id below
`size` occurs once in a corpus: a block's tokens name its exact position, and numbers from
different ranges name their source.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moejax.data import prepare


def number_tokenizer(path, size: int) -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {str(k): k for k in range(size)}
  vocab.update({"</s>": size, "<unk>": size + 1})
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens(["</s>"])  # keeps its id; decoding skips it
  tokenizer.save(str(path))
  return str(path)


def numbered_documents(first: int, count: int, seed: int) -> list[list[int]]:
  """Runs of consecutive numbers covering [first, first + count), 5-60 numbers each."""
  rng = np.random.default_rng(seed)
  documents, k = [], first
  while k < first + count:
    n = min(int(rng.integers(5, 61)), first + count - k)
    documents.append(list(range(k, k + n)))
    k += n
  return documents


def write_jsonl(directory, documents: list[list[int]], files: int = 2) -> str:
  os.makedirs(directory, exist_ok=True)
  for f, part in enumerate(np.array_split(np.arange(len(documents)), files)):
    with open(os.path.join(directory, f"part{f}.jsonl"), "w") as out:
      for d in part:
        out.write(json.dumps({"text": " ".join(map(str, documents[d])), "id": int(d)}) + "\n")
  return os.path.join(directory, "*.jsonl")


def prepared_numbers(tmp, name: str, tokenizer: str, first: int, count: int, **kwargs) -> str:
  """A prepared directory of the numbers [first, first + count) (several shards)."""
  source = write_jsonl(tmp / f"{name}_text", numbered_documents(first, count, seed=first))
  out = str(tmp / name)
  options = {"shard_bytes": 20_000, "log": lambda *a: None, **kwargs}
  prepare.prepare(source, out, tokenizer=tokenizer, **options)
  return out
