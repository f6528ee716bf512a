r"""Prepare throughput (tokens/s) with 1 and 2 worker processes, sentencepiece vs `tokenizers` BPE.

  python -m benchmarks.data_prepare [--copies 4] [--rounds 2] [--vocab 8000]

Input: Shakespeare's 38 plays (the embedded corpus) repeated `--copies` times, one play per
.jsonl line (~5 MB of text per copy), cut into 1 MiB shards. Tokenizers, both with `--vocab`
pieces, both trained here on the plays before timing: a sentencepiece BPE model
(moejax.data.tokenizer, byte fallback) and a Hugging Face byte-level BPE (`tokenizers`,
tokenizer.json). Each (tokenizer, workers) pair prepares into a fresh directory; tokens/s is
the corpus's tokens over the prepare's tokenize-and-write time (worker start-up included),
the median of `--rounds` rounds run round-robin. Tokens per CPU-second (the CPU time of the
prepare and its workers) is the cost that does not depend on how loaded the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from moejax.data import prepare, sources
from moejax.data import tokenizer as sentencepiece_lib


def _huggingface_bpe(plays: list[str], vocab: int, path: str) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab,
    special_tokens=["</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator(plays, trainer)
  tokenizer.save(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--copies", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=8000)
  args = parser.parse_args()
  plays = sources.load_documents("shakespeare")
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, "plays.jsonl")
    with open(source, "w") as f:
      for _ in range(args.copies):
        f.writelines(json.dumps({"text": play}) + "\n" for play in plays)
    spm = os.path.join(tmp, "spm.model")
    with open(spm, "wb") as f:
      f.write(sentencepiece_lib.train_in_memory(plays, args.vocab).model_proto)
    bpe = os.path.join(tmp, "tokenizer.json")
    _huggingface_bpe(plays, args.vocab, bpe)
    size_mb = os.path.getsize(source) / 1e6
    print(f"input: {size_mb:.1f} MB of text ({args.copies} x 38 plays), {os.cpu_count()} CPUs")
    rates: dict[tuple[str, int], list[float]] = {}
    per_cpu_second: dict[str, list[float]] = {}
    runs = 0
    for _ in range(args.rounds):
      for name, tokenizer in (("sentencepiece", spm), ("tokenizers BPE", bpe)):
        for workers in (1, 2):
          out = os.path.join(tmp, f"out{runs}")
          runs += 1
          result = prepare.prepare(
            source,
            out,
            tokenizer=tokenizer,
            workers=workers,
            shard_bytes=2**20,
            log=lambda *a: None,
          )
          rate = result["tokens"] / result["seconds"]
          per_cpu = result["tokens"] / result["cpu_seconds"]
          rates.setdefault((name, workers), []).append(rate)
          per_cpu_second.setdefault(name, []).append(per_cpu)
          print(
            f"{name}, {workers} workers: {result['seconds']:.2f} s = {rate:,.0f} tokens/s; "
            f"{per_cpu:,.0f} tokens per CPU-second; load average {os.getloadavg()[0]:.1f}",
            flush=True,
          )
    print("\nmedian tokens/s | 1 worker | 2 workers | speed-up | tokens per CPU-second")
    for name in ("sentencepiece", "tokenizers BPE"):
      one, two = (float(np.median(rates[(name, w)])) for w in (1, 2))
      cpu = float(np.median(per_cpu_second[name]))
      print(f"{name} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x | {cpu:,.0f}")


if __name__ == "__main__":
  main()
