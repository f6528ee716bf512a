r"""Training start-up time and memory on a tiny vs a >= 2 billion token prepared corpus.

  python -m benchmarks.data_scale make --root /work/bigdata [--tokens 2.1e9]
  python -m benchmarks.data_scale measure --root /work/bigdata [--rounds 2]

`make` writes two prepared corpora under ROOT:
- `tiny`: Shakespeare's plays (the embedded corpus, ~1.4 M tokens) through the real prepare path
  (`moejax.data.prepare --vocab_size 2048`, sentencepiece trained on the text);
- `big`: synthetic token ids, no text: each id drawn from a Zipf(1.1)-shaped distribution over
  the same tokenizer's ordinary ids, an eos with probability 1/500 per position (documents of
  ~500 tokens), shards of 2^27 tokens, written with prepare's own shard and index writers
  (`write_shard_tokens`, `write_index`) and the tiny corpus's tokenizer. Tokenizing ~8 GB of
  text on the 2-core machine would take tens of minutes and measures nothing the reader sees;
  the text -> token throughput is what benchmarks/data_prepare.py measures.
`make` is resumable (finished shards are kept).

`measure` trains `configs/switch_base.py:tiny` for 10 steps on each corpus in a fresh process
(one CPU device, log_every=1), alternating the corpora for `--rounds` rounds, and reports per
corpus the start-up time (process start to the end of step 1, from the step-1 line of
metrics.jsonl) and the resident memory (VmRSS) of the process after step 10. It also times,
in its own process, opening each corpus and reading its first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_TOKENS = 2**27
CHUNK_TOKENS = 2**23


def make(root: str, tokens: float) -> None:
  from moejax.data import prepare, shard_format, sources, tokenizer_files

  tiny = os.path.join(root, "tiny")
  if not os.path.exists(os.path.join(tiny, shard_format.INDEX)):
    with tempfile.TemporaryDirectory() as text_dir:
      for i, play in enumerate(sources.load_documents("shakespeare")):
        with open(os.path.join(text_dir, f"play_{i:02d}.txt"), "w") as f:
          f.write(play)
      prepare.prepare(os.path.join(text_dir, "*.txt"), tiny, vocab_size=2048)
  big = os.path.join(root, "big")
  os.makedirs(big, exist_ok=True)
  tok_name = "tokenizer.model"
  with open(os.path.join(tiny, tok_name), "rb") as f:
    tok_bytes = f.read()
  tok = tokenizer_files.from_bytes(tok_bytes, tok_name)
  shutil.copyfile(os.path.join(tiny, tok_name), os.path.join(big, tok_name))
  num_shards = -(-int(tokens) // SHARD_TOKENS)
  ordinary = np.arange(4, tok.vocab_size)  # ids 0-3 are unk, bos, eos, pad
  zipf = 1.0 / np.arange(1, ordinary.size + 1) ** 1.1
  cdf = np.cumsum(zipf / zipf.sum())
  for i in range(num_shards):
    if prepare._is_finished(big, i):
      continue
    start = time.perf_counter()
    rng = np.random.default_rng([2026, i])

    def chunks(rng=rng):
      for _ in range(SHARD_TOKENS // CHUNK_TOKENS):
        ids = ordinary[
          np.minimum(np.searchsorted(cdf, rng.random(CHUNK_TOKENS)), ordinary.size - 1)
        ]
        ids[rng.random(CHUNK_TOKENS) < 1 / 500] = tok.eos_id
        yield ids.astype(np.int64), int((ids == tok.eos_id).sum())

    prepare.write_shard_tokens(big, i, chunks(), tok.vocab_size, [["synthetic", i]])
    print(f"big: shard {i + 1}/{num_shards} in {time.perf_counter() - start:.1f} s", flush=True)
  settings = {
    "format": shard_format.FORMAT,
    "synthetic": "Zipf(1.1) ids over the ordinary ids of tiny's tokenizer, eos p=1/500, seed 2026",
    "tokenizer": {"name": tok_name, "sha256": tokenizer_files.sha256_of(tok_bytes)},
  }
  index = prepare.write_index(big, num_shards, settings, tok_name, tok_bytes, tok)
  print(f"big: {index['tokens']} tokens in {num_shards} shards")


def _child(data: str, workdir: str) -> None:
  """Trains 10 steps on `data`, then prints the process's resident memory as JSON."""
  sys.argv = sys.argv[:1]
  from moejax import config_lib, train

  cfg = config_lib.switch_base_family("tiny", "configs/switch_base.py")
  cfg.data.source = f"prepared:{data}"
  cfg.train.steps, cfg.train.log_every, cfg.data.eval_batches = 10, 1, 2
  train.run(cfg, workdir, progress=False)
  status = dict(line.split(":", 1) for line in open("/proc/self/status"))
  rss_kb = int(status["VmRSS"].split()[0])
  print(json.dumps({"rss_mb": rss_kb / 1024}), flush=True)


def _run_once(data: str) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.time()
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "benchmarks.data_scale",
        "child",
        "--data",
        data,
        "--workdir",
        workdir,
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      first = next(json.loads(line) for line in f if json.loads(line)["step"] == 1)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return {"startup_s": first["time"] - start, **result}


def measure(root: str, rounds: int) -> None:
  corpora = {name: os.path.join(root, name) for name in ("tiny", "big")}
  for name, path in corpora.items():
    with open(os.path.join(path, "index.json")) as f:
      index = json.load(f)
    size = sum(r["bytes"] for r in index["shards"]) / 2**30
    print(f"{name}: {index['tokens']:,} tokens, {len(index['shards'])} shards, {size:.2f} GiB")
  for name, path in corpora.items():  # the data part alone, in this process
    from moejax.data import mixture

    start = time.perf_counter()
    data = mixture.open_source(f"prepared:{path}", seq_len=128, val_fraction=0.05, vocab_size=2048)
    next(data.train_iterator(16, 0, (0, 16)))
    seconds = time.perf_counter() - start
    print(f"{name}: open + index checks + first batch of 16 x 129 tokens: {seconds * 1e3:.0f} ms")
  results = {name: [] for name in corpora}
  for r in range(rounds):
    for name, path in corpora.items():
      results[name].append(_run_once(path))
      print(f"round {r}: {name} {results[name][-1]}", flush=True)
  median = {n: {k: float(np.median([x[k] for x in v])) for k in v[0]} for n, v in results.items()}
  ratio = median["big"]["startup_s"] / median["tiny"]["startup_s"]
  extra = median["big"]["rss_mb"] - median["tiny"]["rss_mb"]
  tiny, big = median["tiny"], median["big"]
  print(
    f"start-up (process start -> step 1 done), median of {rounds}: tiny "
    f"{tiny['startup_s']:.2f} s, big {big['startup_s']:.2f} s, ratio {ratio:.2f} (target <= 2)"
  )
  print(
    f"RSS after step 10, median: tiny {tiny['rss_mb']:.0f} MB, big {big['rss_mb']:.0f} MB, "
    f"difference {extra:+.0f} MB (target <= 300 MB)"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("make", "measure", "child"))
  parser.add_argument("--root", default="/work/bigdata")
  parser.add_argument("--tokens", type=float, default=2.1e9)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--data", default="")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  if args.command == "make":
    make(args.root, args.tokens)
  elif args.command == "measure":
    measure(args.root, args.rounds)
  else:
    _child(args.data, args.workdir)


if __name__ == "__main__":
  main()
