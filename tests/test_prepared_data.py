"""Reading prepared corpora: block space, held-out part, rows, resume, mixtures, bad input.

The corpora hold runs of distinct numbers (tests/prepared_corpus.py), so a block's tokens say
exactly where it was cut from and which source it came from.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moejax.data import mixture, shard_format, shards
from tests import prepared_corpus

SIZE = 40_000  # numbers 0..39999; eos = SIZE
RANGES = {"a": (0, 12_000), "b": (20_000, 6_000), "c": (30_000, 6_000)}
L, VAL = 8, 0.1


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("prepared")
  tokenizer = prepared_corpus.number_tokenizer(tmp / "tokenizer.json", SIZE)
  return {
    name: prepared_corpus.prepared_numbers(tmp, name, tokenizer, first, count)
    for name, (first, count) in RANGES.items()
  }


def _open(entries, vocab_size=SIZE + 2):
  return mixture.PreparedData(entries, seq_len=L, val_fraction=VAL, vocab_size=vocab_size)


def _all_blocks(directory):
  """Brute force: every shard cut into blocks of L + 1, in corpus order."""
  corpus = shards.PreparedCorpus(directory)
  parts = []
  for i in range(corpus.num_shards):
    tokens = np.asarray(corpus.shard_tokens(i), np.int32)
    parts.append(tokens[: tokens.size // (L + 1) * (L + 1)].reshape(-1, L + 1))
  return np.concatenate(parts)


def _rows(batch):
  """int32[b, L + 1] blocks back from {inputs, targets}."""
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _source_of(block):
  number = int(block[block != SIZE][0])
  return next(n for n, (first, count) in RANGES.items() if first <= number < first + count)


def test_block_space_splits_every_kth_block_off_for_validation(corpora):
  corpus = shards.PreparedCorpus(corpora["a"])
  assert corpus.num_shards > 3
  space = corpus.blocks(L, VAL)
  blocks = _all_blocks(corpora["a"])
  is_val = np.arange(len(blocks)) % 10 == 9
  np.testing.assert_array_equal(
    space.read(space.train_block(np.arange(space.num_train))), blocks[~is_val]
  )
  np.testing.assert_array_equal(
    space.read(space.val_block(np.arange(space.num_val))), blocks[is_val]
  )


def test_an_epoch_reads_every_training_block_once_and_no_heldout_block(corpora):
  data = _open([(corpora["a"], 1.0)])
  space = data.spaces[0]
  batch = 16
  it = data.train_iterator(batch, seed=0, rows=(0, batch))
  read = np.concatenate([_rows(next(it)) for _ in range(-(-space.num_train // batch))])
  seen = [tuple(r) for r in read[: space.num_train]]
  train = space.read(space.train_block(np.arange(space.num_train)))
  assert sorted(seen) == sorted(tuple(r) for r in train)
  held_out = {tuple(r) for r in space.read(space.val_block(np.arange(space.num_val)))}
  assert not held_out & {tuple(r) for r in read}
  assert seen != sorted(seen)  # shuffled


def test_rows_of_processes_concatenate_to_the_global_batch_and_resume_exactly(corpora):
  data = _open([(corpora["a"], 0.7), (corpora["b"], 0.3)])
  whole = data.train_iterator(8, seed=3, rows=(0, 8))
  left, right = data.train_iterator(8, 3, (0, 3)), data.train_iterator(8, 3, (3, 8))
  batches = [_rows(next(whole)) for _ in range(8)]
  for b in batches[:6]:
    np.testing.assert_array_equal(np.concatenate([_rows(next(left)), _rows(next(right))]), b)
  state = json.loads(json.dumps(left.get_state()))  # what a checkpoint stores
  assert state == {"next_index": 6}
  resumed = data.train_iterator(8, 3, (0, 3))
  resumed.set_state(state)
  for b in batches[6:]:
    np.testing.assert_array_equal(_rows(next(resumed)), b[:3])
  other_seed = _rows(next(data.train_iterator(8, 4, (0, 8))))
  assert not np.array_equal(other_seed, batches[0])


def test_mixture_proportions_within_one_percent_over_10000_sequences(corpora):
  weights = {"a": 0.6, "b": 0.25, "c": 0.15}
  data = _open([(corpora[n], w) for n, w in weights.items()])
  batch, steps = 100, 100
  it = data.train_iterator(batch, seed=0, rows=(0, batch))
  sources = [_source_of(r) for _ in range(steps) for r in _rows(next(it))]
  assert len(sources) == 10_000
  for name, weight in weights.items():
    observed = sources.count(name) / len(sources)
    print(f"{name}: weight {weight}, observed {observed:.4f}")
    assert abs(observed - weight) < 0.01, (name, observed, weight)
  # The reported token counts are the rows each source gave, times L.
  counts = data.token_counts(steps, batch)
  names = data.names
  assert counts == {
    f"data_tokens/{n}": sources.count(s) * L for n, s in zip(names, weights, strict=True)
  }


def test_schedule_gives_each_source_its_sequences_in_order():
  schedule = mixture.Schedule([3.0, 1.0, 0.5], period=64)
  assert schedule.counts.tolist() == [43, 14, 7] and schedule.counts.sum() == 64
  source, position = schedule.locate(np.arange(1000))
  for s in range(3):  # brute force: the k-th sequence of source s is its position k
    np.testing.assert_array_equal(position[source == s], np.arange((source == s).sum()))
  for n in (0, 1, 63, 64, 65, 999):
    np.testing.assert_array_equal(
      schedule.sequences_before(n), np.bincount(source[:n], minlength=3)
    )


def test_eval_batches_read_only_heldout_blocks_in_the_same_mixture(corpora):
  data = _open([(corpora["a"], 0.5), (corpora["c"], 0.5)])
  held_out = set()
  for space in data.spaces:
    held_out |= {tuple(r) for r in space.read(space.val_block(np.arange(space.num_val)))}
  batches = data.eval_batches(8, 4, (0, 8))
  assert len(batches) == 4
  rows = [tuple(r) for b in batches for r in _rows(b)]
  assert set(rows) <= held_out and len(set(rows)) == len(rows)
  assert {_source_of(np.asarray(r)) for r in rows} == {"a", "c"}
  np.testing.assert_array_equal(_rows(data.eval_batches(8, 4, (2, 5))[1]), _rows(batches[1])[2:5])


# Bad input: one line, nothing written.


def _snapshot(directory):
  return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


@pytest.fixture
def damaged(corpora, tmp_path):
  """A copy of corpus 'b' to damage."""
  import shutil

  return shutil.copytree(corpora["b"], tmp_path / "b")


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: os.remove(d / "shard_00001.bin"), r"shard .*shard_00001.bin is missing"),
    (
      lambda d: _truncate(d / "shard_00001.bin"),
      r"shard_00001.bin is truncated \(\d+ of \d+ bytes",
    ),
    (lambda d: _edit_index(d, tokens=1), r"does not match its shards"),
    (lambda d: _edit_index(d, shard_tokens=1), r"does not match its shards"),
    (lambda d: os.remove(d / "index.json"), r"has no index.json"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), r"is not the tokenizer"),
  ],
)
def test_damaged_corpus_is_one_line_naming_the_fix(damaged, damage, message):
  damage(damaged)
  before = _snapshot(damaged)
  with pytest.raises(shard_format.PreparedDataError, match=message) as e:
    _open([(f"prepared:{damaged}", 1.0)])
  assert "\n" not in str(e.value) and "prepare" in str(e.value)
  assert _snapshot(damaged) == before


def test_sha256_verification_finds_a_changed_byte(damaged):
  path = damaged / "shard_00000.bin"
  raw = bytearray(path.read_bytes())
  raw[10] ^= 1
  path.write_bytes(bytes(raw))
  _open([(str(damaged), 1.0)])  # sizes still match
  with pytest.raises(shard_format.PreparedDataError, match=r"does not have the sha256"):
    mixture.PreparedData(
      [(str(damaged), 1)], seq_len=L, val_fraction=VAL, vocab_size=SIZE + 2, verify="sha256"
    )


def test_tokenizer_larger_than_the_model_vocabulary(corpora):
  with pytest.raises(
    shard_format.PreparedDataError,
    match=r"40002 ids, more than model.vocab_size=4096; set model.vocab_size=40002",
  ):
    _open([(corpora["a"], 1.0)], vocab_size=4096)


@pytest.mark.parametrize(
  "spec, message",
  [
    ("/data/a:0.5,/data/b", r"entry '/data/b' is not DIR:WEIGHT"),
    ("/data/a:x", r"is not DIR:WEIGHT"),
    ("/data/a:-1", r"is not DIR:WEIGHT"),
    ("/data/a:nan", r"is not DIR:WEIGHT"),
    ("/data/a:0,/data/b:0", r"the weights sum to 0"),
  ],
)
def test_mixture_weights_that_do_not_parse(spec, message):
  with pytest.raises(shard_format.PreparedDataError, match=message):
    mixture.parse_mixture(spec)


def test_mixture_of_different_tokenizers_or_a_vanishing_weight(corpora, tmp_path):
  tokenizer = prepared_corpus.number_tokenizer(tmp_path / "tokenizer.json", 500)
  other = prepared_corpus.prepared_numbers(tmp_path, "other", tokenizer, 0, 500)
  with pytest.raises(shard_format.PreparedDataError, match=r"different tokenizers"):
    _open([(corpora["a"], 1.0), (other, 1.0)])
  with pytest.raises(shard_format.PreparedDataError, match=r"below 1/4096 of the total"):
    _open([(corpora["a"], 1.0), (corpora["b"], 1e-5)])


def _truncate(path):
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])


def _edit_index(directory, tokens=0, shard_tokens=0):
  index = json.loads((directory / "index.json").read_text())
  index["tokens"] += tokens
  index["shards"][0]["tokens"] += shard_tokens
  index["tokens"] += shard_tokens
  (directory / "index.json").write_text(json.dumps(index))


def test_a_bucket_url_is_refused_in_one_line_not_read_as_a_local_folder():
  with pytest.raises(shard_format.PreparedDataError, match=r"local or mounted folders") as e:
    _open([("prepared:gs://bucket/web", 1.0)])
  assert "\n" not in str(e.value) and "gs://bucket/web" in str(e.value)
