"""Training and evaluation batches from prepared corpora: one (`prepared:DIR`) or a mixture.

Dimension letters: B global batch, b rows of this process, L sequence length, S sources,
M sequences per schedule period.

The data pipeline (`pipeline.build_dataset`) opens prepared sources through here:
  data = open_source(source, mixture, seq_len=..., val_fraction=..., vocab_size=...)
  rows = pipeline.process_rows(batch_sharding, B, L)  # this process's rows [r0, r1)
  it = data.train_iterator(B, seed, rows)         # grain iterator; get_state / set_state
  evals = data.eval_batches(B, num_batches, rows)
  metrics = data.token_counts(step, B)            # tokens read per source so far

Schedule. Global sequence n = step * B + row. Source s gets c_s of every M = PERIOD sequences
(c = the weights' largest-remainder apportionment of M), spread evenly through the period: the
j-th of source s sits at rank (j + 1/2) / c_s of the period. So sequence n is from source
pattern[n % M], and it is that source's sequence number (n // M) * c_s + j: no state beyond the
step, exact on resume, the same for any number of processes, and any window of N sequences
holds each source's share to within (S + 1) / N.

Order within a source. Its sequence p is training block shuffle(p) of a grain
`MapDataset.range(num_train).shuffle(seed_s).repeat()`: a new permutation every epoch, computed
per index (no table), seed_s derived from (train.seed, s). Evaluation reads the held-out blocks
in order with the same source pattern. A process reads only the blocks of its own rows.
"""

from __future__ import annotations

import math
import os
import sys

import grain
import numpy as np

from moejax.data import shards, tokenizer_files
from moejax.data.shard_format import PREFIX, PreparedDataError

PERIOD = 4096
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def uses_prepared(source: str, mixture: str) -> bool:
  """Whether `data.source` / `data.mixture` name prepared corpora (this module's business)."""
  return bool(mixture.strip()) or source.startswith(PREFIX)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'DIR:WEIGHT,DIR:WEIGHT' -> [(DIR, weight)] (a 'prepared:' prefix on DIR is optional)."""
  entries = []
  for item in (part.strip() for part in spec.split(",")):
    directory, _, weight = item.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = math.nan
    if not directory or not math.isfinite(value) or value < 0:
      raise PreparedDataError(
        f"data.mixture={spec!r}: entry {item!r} is not DIR:WEIGHT with a weight >= 0; write "
        "e.g. data.mixture='/data/web:0.7,/data/code:0.3'"
      )
    entries.append((directory, value))
  if sum(w for _, w in entries) <= 0:
    raise PreparedDataError(
      f"data.mixture={spec!r}: the weights sum to 0; give at least one positive weight"
    )
  return entries


def apportion(weights: list[float], period: int = PERIOD) -> np.ndarray:
  """int64[S] sequences per period for each source (largest remainder; sums to `period`)."""
  quotas = np.asarray(weights, np.float64) / sum(weights) * period
  counts = np.floor(quotas).astype(np.int64)
  order = np.argsort(-(quotas - counts), kind="stable")
  counts[order[: period - counts.sum()]] += 1
  return counts


class Schedule:
  """Which source, and which of its sequences, each global sequence n is (module docstring)."""

  def __init__(self, weights: list[float], period: int = PERIOD):
    self.period, self.counts = period, apportion(weights, period)
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts if c])
    sources = np.concatenate([np.full(c, s) for s, c in enumerate(self.counts) if c])
    ranks = np.concatenate([np.arange(c) for c in self.counts if c])
    order = np.argsort(keys, kind="stable")
    self.pattern, self.rank = sources[order], ranks[order]  # int[M] each
    one_hot = self.pattern[:, None] == np.arange(len(self.counts))[None, :]
    self.prefix = np.concatenate([np.zeros([1, len(self.counts)], np.int64), np.cumsum(one_hot, 0)])

  def locate(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, that source's sequence number) of global sequences `n` (int64[N] each)."""
    n = np.asarray(n, np.int64)
    source = self.pattern[n % self.period]
    return source, (n // self.period) * self.counts[source] + self.rank[n % self.period]

  def sequences_before(self, n: int) -> np.ndarray:
    """int64[S]: how many of global sequences [0, n) each source gives."""
    return (n // self.period) * self.counts + self.prefix[n % self.period]


class PreparedData:
  """Prepared sources with their schedule; see the module docstring for the methods.

  Attributes:
    names: a short name per source (metric keys `data_tokens/<name>`).
    tokenizer: the sources' (shared) tokenizer.
    unigram_entropy_nats: entropy of the weighted mixture of the sources' token frequencies.
  """

  def __init__(self, entries, *, seq_len, val_fraction, vocab_size, verify="size"):
    entries = [(d, w) for d, w in entries if w > 0]
    self.corpora = [shards.PreparedCorpus(d, verify=verify) for d, _ in entries]
    self.weights = [w for _, w in entries]
    first = self.corpora[0]
    for corpus in self.corpora[1:]:
      if corpus.tokenizer_sha256 != first.tokenizer_sha256:
        raise PreparedDataError(
          f"data.mixture: {corpus.directory!r} and {first.directory!r} were prepared with "
          "different tokenizers; prepare every source with the same --tokenizer"
        )
    if first.vocab_size > vocab_size:
      raise PreparedDataError(
        f"the tokenizer of {first.directory!r} has {first.vocab_size} ids, more than "
        f"model.vocab_size={vocab_size}; set model.vocab_size={first.vocab_size} (or more)"
      )
    self.schedule = Schedule(self.weights)
    for corpus, weight, count in zip(self.corpora, self.weights, self.schedule.counts, strict=True):
      if count == 0:
        raise PreparedDataError(
          f"data.mixture: weight {weight} of {corpus.directory!r} is below 1/{PERIOD} of the "
          "total, so it would never be read; raise it or leave that source out"
        )
    self.seq_len = seq_len
    self.spaces = [c.blocks(seq_len, val_fraction) for c in self.corpora]
    self.names = _names([c.directory for c in self.corpora])
    self.tokenizer = first.tokenizer()
    self.unigram_entropy_nats = _mixture_entropy(self.corpora, self.weights)

  def train_iterator(self, global_batch: int, seed: int, rows: tuple[int, int] | None):
    """Endless grain iterator of {inputs, targets: int32[b, L]}: rows [r0, r1) of each global
    training batch. `get_state()` is {"next_index": step}; `set_state` resumes exactly."""
    rows = check_rows(rows, global_batch)
    orders = [
      grain.MapDataset.range(space.num_train).shuffle(seed=_source_seed(seed, s)).repeat(None)
      for s, space in enumerate(self.spaces)
    ]

    def batch(step: int) -> dict[str, np.ndarray]:
      n = step * global_batch + np.arange(*rows)
      return self._read(n, lambda s, p: self.spaces[s].train_block([orders[s][i] for i in p]))

    return iter(grain.MapDataset.source(_Steps(batch)).to_iter_dataset(_READ_OPTIONS))

  def eval_batches(self, global_batch: int, num_batches: int, rows: tuple[int, int] | None):
    """The first min(num_batches, available) held-out batches, rows [r0, r1) of each."""
    rows = check_rows(rows, global_batch)
    available = num_batches
    while available and any(
      self.schedule.sequences_before(available * global_batch)
      > [space.num_val for space in self.spaces]
    ):
      available -= 1
    if available == 0:
      raise PreparedDataError(
        f"the held-out blocks of {[c.directory for c in self.corpora]} "
        f"({[s.num_val for s in self.spaces]}) do not make one batch of {global_batch}: raise "
        "data.val_fraction, lower train.batch_size or train.seq_len, or use more data"
      )
    batches = []
    for i in range(available):
      n = i * global_batch + np.arange(*rows)
      batches.append(self._read(n, lambda s, p: self.spaces[s].val_block(p)))
    return batches

  def token_counts(self, step: int, global_batch: int) -> dict[str, float]:
    """Training tokens (targets) each source has given after `step` steps."""
    before = self.schedule.sequences_before(step * global_batch) * self.seq_len
    return {f"data_tokens/{name}": float(v) for name, v in zip(self.names, before, strict=True)}

  def _read(self, n: np.ndarray, blocks_of) -> dict[str, np.ndarray]:
    """Blocks of global sequences `n`: blocks_of(source, positions) gives corpus block ids."""
    source, position = self.schedule.locate(n)
    out = np.empty([len(n), self.seq_len + 1], np.int32)
    for s in np.unique(source).tolist():
      mine = source == s
      out[mine] = self.spaces[s].read(blocks_of(s, position[mine].tolist()))
    return {"inputs": out[:, :-1].copy(), "targets": out[:, 1:].copy()}


def open_source(
  source: str,
  mixture: str = "",
  *,
  seq_len: int,
  val_fraction: float,
  vocab_size: int,
  verify: str = "size",
) -> PreparedData:
  """Opens `data.mixture` when set, else the single `data.source` 'prepared:DIR'."""
  entries = parse_mixture(mixture) if mixture.strip() else [(source, 1.0)]
  return PreparedData(
    entries, seq_len=seq_len, val_fraction=val_fraction, vocab_size=vocab_size, verify=verify
  )


class _Steps:
  """A grain data source whose element `step` is that step's batch (endless)."""

  def __init__(self, batch):
    self._batch = batch

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, step: int):
    return self._batch(int(step))


def check_rows(rows, global_batch: int) -> tuple[int, int]:
  """(r0, r1) of `rows` (None: the whole batch); ValueError unless 0 <= r0 < r1 <= B."""
  r0, r1 = (0, global_batch) if rows is None else rows
  if not 0 <= r0 < r1 <= global_batch:
    raise ValueError(f"rows {rows} are not a non-empty range of a batch of {global_batch}")
  return r0, r1


def _source_seed(seed: int, source: int) -> int:
  return int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


def _names(directories: list[str]) -> list[str]:
  names = []
  for i, directory in enumerate(directories):
    name = "".join(c if c.isalnum() else "_" for c in os.path.basename(directory.rstrip("/")))
    names.append(name if name and name not in names else f"{name}_{i}")
  return names


def _mixture_entropy(corpora, weights) -> float:
  """Entropy in nats of sum_s w_s * (token frequencies of source s) / sum(w)."""
  mix = 0.0
  for corpus, weight in zip(corpora, weights, strict=True):
    counts = corpus.token_counts()
    mix = mix + weight / sum(weights) * counts / max(counts.sum(), 1)
  p = mix[mix > 0]
  return float(-(p * np.log(p)).sum())


def evaluation_batches(cfg, workdir: str, data: str, num_batches: int | None) -> list:
  """Global host batches for `moejax.evaluate --data prepared:DIR`: that directory's held-out
  blocks (its tokenizer must be the run's). Default: data.eval_batches batches."""
  d = cfg.data
  prepared = open_source(
    data,
    seq_len=cfg.train.seq_len,
    val_fraction=d.val_fraction,
    vocab_size=cfg.model.vocab_size,
    verify=d.prepared_verify,
  )
  run_sha = _run_tokenizer_sha256(d, workdir)
  if run_sha is not None and run_sha != prepared.corpora[0].tokenizer_sha256:
    raise PreparedDataError(
      f"--data {data!r} was prepared with another tokenizer than the run in {workdir!r}; "
      "prepare it with the run's tokenizer (--tokenizer)"
    )
  batch = cfg.train.batch_size
  return prepared.eval_batches(batch, num_batches or d.eval_batches, (0, batch))


def run_tokenizer(data_cfg):
  """The tokenizer of a run trained on prepared data (the config's `data` section)."""
  return _first_corpus(data_cfg).tokenizer()


def _first_corpus(data_cfg) -> shards.PreparedCorpus:
  d = data_cfg
  entries = parse_mixture(d.mixture) if d.mixture.strip() else [(d.source, 1.0)]
  return shards.PreparedCorpus(next(e for e, w in entries if w > 0))


def _run_tokenizer_sha256(data_cfg, workdir: str) -> str | None:
  if uses_prepared(data_cfg.source, data_cfg.mixture):
    return _first_corpus(data_cfg).tokenizer_sha256
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return tokenizer_files.sha256_of(f.read())
