"""moejax.data.prepare: every input format, both tokenizer kinds, workers, resume, bad input."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.data import prepare, readers, shard_format, shards, tokenizer_files
from moejax.data import tokenizer as sentencepiece_lib
from tests import prepared_corpus

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *a: None}
_WORDS = "the king queen night sword crown ghost sea ship speak love death ale ring".split()


def _text(rng, n):
  return " ".join(rng.choice(_WORDS, size=n)) + "."


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
  """One file of each format; returns (glob, the documents in the order prepare must read)."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  d = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  a = [_text(rng, int(rng.integers(5, 80))) for _ in range(300)]
  b = [_text(rng, int(rng.integers(5, 80))) for _ in range(100)]
  c = _text(rng, 50)
  p = [_text(rng, int(rng.integers(5, 80))) for _ in range(200)]
  with open(d / "a.jsonl", "w") as f:
    for i, t in enumerate(a):
      f.write(json.dumps({"body": t, "n": i}) + ("\n\n" if i == 7 else "\n"))  # a blank line
  with gzip.open(d / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"body": t}) + "\n" for t in b)
  (d / "c.txt").write_text(c)
  pq.write_table(pa.table({"body": p, "n": list(range(200))}), d / "d.parquet", row_group_size=30)
  return str(d / "*"), a + b + [c] + p


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  rng = np.random.default_rng(1)
  tok = sentencepiece_lib.train_in_memory([_text(rng, 400) for _ in range(50)], 300)
  path = tmp_path_factory.mktemp("spm") / "spm.model"
  path.write_bytes(tok.model_proto)
  return str(path)


def _stream(out) -> np.ndarray:
  corpus = shards.PreparedCorpus(str(out), verify="sha256")
  return np.concatenate([np.asarray(corpus.shard_tokens(i)) for i in range(corpus.num_shards)])


def _files(out) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


@pytest.mark.parametrize("workers", [1, 2])
def test_every_format_is_the_documents_tokenized_in_order(
  mixed_inputs, spm_file, tmp_path, workers
):
  source, documents = mixed_inputs
  out = tmp_path / "out"
  index = prepare.prepare(
    source, str(out), tokenizer=spm_file, field="body", shard_bytes=6000, workers=workers, **QUIET
  )
  assert len(index["shards"]) > 5  # the .jsonl and .parquet inputs were split
  tok = tokenizer_files.load(spm_file)
  expected = np.concatenate([tok.encode(d) + [tok.eos_id] for d in documents])
  np.testing.assert_array_equal(_stream(out), expected)
  assert index["documents"] == len(documents) and index["tokens"] == expected.size
  assert index["dtype"] == "uint16"
  counts = np.load(out / shard_format.TOKEN_COUNTS)
  np.testing.assert_array_equal(counts, np.bincount(expected, minlength=tok.vocab_size))


def test_workers_and_reruns_give_identical_bytes(mixed_inputs, spm_file, tmp_path):
  source, _ = mixed_inputs
  one, two = tmp_path / "one", tmp_path / "two"
  opts = dict(tokenizer=spm_file, field="body", shard_bytes=6000, **QUIET)
  prepare.prepare(source, str(one), workers=1, **opts)
  prepare.prepare(source, str(two), workers=2, **opts)
  assert _files(one) == _files(two)
  again = prepare.prepare(source, str(two), workers=2, **opts)  # finished: nothing redone
  assert again["new_tokens"] == 0 and _files(one) == _files(two)


def test_huggingface_tokenizer_json(tmp_path):
  tokenizer = prepared_corpus.number_tokenizer(tmp_path / "tokenizer.json", 1000)
  out = prepared_corpus.prepared_numbers(tmp_path, "numbers", tokenizer, 0, 1000)
  corpus = shards.PreparedCorpus(out)
  assert corpus.index["tokenizer"]["kind"] == "huggingface" and corpus.eos_id == 1000
  documents = prepared_corpus.numbered_documents(0, 1000, seed=0)
  expected = np.concatenate([d + [1000] for d in documents])
  assert len(documents) > 1 and corpus.vocab_size == 1002
  np.testing.assert_array_equal(_stream(out), expected)
  assert corpus.tokenizer().decode([5, 6, 1000, 7]) == "5 6 7"


def test_vocab_size_trains_a_sentencepiece_model_on_a_sample(mixed_inputs, tmp_path):
  source, documents = mixed_inputs
  out = tmp_path / "out"
  prepare.prepare(source, str(out), vocab_size=320, field="body", **QUIET)
  tok = shards.PreparedCorpus(str(out)).tokenizer()
  assert tok.kind == "sentencepiece" and tok.vocab_size == 320
  assert tok.decode(tok.encode(documents[0])) == documents[0]


def test_interrupted_prepare_resumes_to_identical_shards(mixed_inputs, spm_file, tmp_path):
  source, _ = mixed_inputs
  opts = dict(tokenizer=spm_file, field="body", shard_bytes=3000, workers=2, **QUIET)
  clean, cut = tmp_path / "clean", tmp_path / "cut"
  prepare.prepare(source, str(clean), **opts)
  with pytest.raises(prepare.PrepareInterrupted):
    prepare.prepare(source, str(cut), stop_after_shards=3, **opts)
  assert not (cut / shard_format.INDEX).exists()
  done = {p.name: p.stat().st_mtime_ns for p in cut.glob("shard_*.json")}
  assert len(done) >= 3
  resumed = prepare.prepare(source, str(cut), **opts)
  assert resumed["new_tokens"] < resumed["tokens"]
  assert _files(clean) == _files(cut)
  for name, mtime in done.items():  # finished shards were not redone
    assert (cut / name).stat().st_mtime_ns == mtime, name


def test_killed_prepare_cli_resumes_to_identical_shards(tmp_path):
  """SIGKILL the whole prepare (main process and workers) mid-run, then rerun it."""
  big = [list(range(k, k + 50)) for k in range(0, 60_000, 50)]
  source = prepared_corpus.write_jsonl(tmp_path / "text", big, files=3)
  tokenizer = prepared_corpus.number_tokenizer(tmp_path / "tokenizer.json", 60_000)
  args = [sys.executable, "-m", "moejax.data.prepare", "--source", source]
  args += ["--tokenizer", tokenizer, "--workers", "2", "--shard_bytes", "4000"]
  subprocess.run([*args, "--out", str(tmp_path / "clean")], check=True, capture_output=True)
  cut = tmp_path / "cut"
  proc = subprocess.Popen([*args, "--out", str(cut)], cwd=ROOT, start_new_session=True)
  deadline = time.monotonic() + 120
  while len(list(cut.glob("shard_*.json"))) < 5:
    assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before the kill"
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (cut / shard_format.INDEX).exists()
  subprocess.run([*args, "--out", str(cut)], check=True, capture_output=True)
  assert _files(tmp_path / "clean") == _files(cut)


# Bad input: one line, raised before anything is written (or with nothing written over).


def test_a_record_without_the_field_is_named_before_any_shard(mixed_inputs, spm_file, tmp_path):
  source, _ = mixed_inputs
  with pytest.raises(readers.InputError, match=r"a\.jsonl:1 has no string field 'text'.*--field"):
    prepare.prepare(source, str(tmp_path / "out"), tokenizer=spm_file, **QUIET)
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
  (tmp_path / "p").mkdir()
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p" / "x.parquet")
  with pytest.raises(readers.InputError, match=r"x\.parquet has no string column 'text'"):
    prepare.prepare(str(tmp_path / "p" / "*"), str(tmp_path / "o2"), tokenizer=spm_file, **QUIET)


def test_out_holding_another_corpus_is_refused_untouched(mixed_inputs, spm_file, tmp_path):
  source, _ = mixed_inputs
  out = tmp_path / "out"
  prepare.prepare(source, str(out), tokenizer=spm_file, field="body", **QUIET)
  before = _files(out)
  with pytest.raises(shard_format.PreparedDataError, match=r"other inputs or settings.*shard_byt"):
    prepare.prepare(source, str(out), tokenizer=spm_file, field="body", shard_bytes=99, **QUIET)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(shard_format.PreparedDataError, match=r"non-empty directory"):
    prepare.prepare(source, str(tmp_path / "other"), tokenizer=spm_file, field="body", **QUIET)
  assert _files(out) == before and (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(), r"exactly one of --tokenizer"),
    (dict(tokenizer="/no/such.model"), r"cannot be read"),
    (dict(vocab_size=300, workers=0), r"--workers=0"),
  ],
)
def test_bad_arguments_are_one_line(mixed_inputs, tmp_path, kwargs, message):
  with pytest.raises(shard_format.PreparedDataError, match=message) as e:
    prepare.prepare(mixed_inputs[0], str(tmp_path / "o"), field="body", **kwargs, **QUIET)
  assert "\n" not in str(e.value)


def test_cli_reports_one_line_and_exit_2(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"txt": "hello"}\n')
  args = ["--source", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")]
  command = [sys.executable, "-m", "moejax.data.prepare", *args, "--vocab_size", "300"]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "has no string field 'text'" in out.stderr


def test_shard_sha256_in_the_index_is_the_file_hash(mixed_inputs, spm_file, tmp_path):
  out = tmp_path / "out"
  index = prepare.prepare(mixed_inputs[0], str(out), tokenizer=spm_file, field="body", **QUIET)
  for record in index["shards"]:
    assert hashlib.sha256((out / record["file"]).read_bytes()).hexdigest() == record["sha256"]
