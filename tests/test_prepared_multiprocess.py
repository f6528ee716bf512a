"""Two processes x 4 CPU devices read disjoint rows of a prepared mixture's global batches.

For each mesh layout, both processes run tests/prepared_rows_worker.py: each takes its rows
from the batch sharding, reads only those, and builds global arrays from them. The rows must be
disjoint, cover the batch, concatenate to the single-process batch (3 training batches and the
eval batches), and the global arrays gathered back must equal the single-process batch.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moejax.data import mixture
from tests import prepared_corpus

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ_LEN, SEED = 16, 8, 5  # as in tests/prepared_rows_worker.py (not imported: it sets
# XLA_FLAGS for its own process)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mp")
  tokenizer = prepared_corpus.number_tokenizer(tmp / "tokenizer.json", 9000)
  a = prepared_corpus.prepared_numbers(tmp, "a", tokenizer, 0, 6000)
  b = prepared_corpus.prepared_numbers(tmp, "b", tokenizer, 6000, 3000)
  return f"{a}:0.6,{b}:0.4"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["data=2,expert=4", "data=4,tensor=2"])
def test_two_processes_read_disjoint_rows_of_the_global_batch(spec, layout, tmp_path):
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  worker = [sys.executable, "-m", "tests.prepared_rows_worker"]
  procs = [
    subprocess.Popen(
      [*worker, str(i), port, layout, spec, str(tmp_path / f"p{i}.npz")],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, output in zip(procs, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]
  results = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
  (a0, a1), (b0, b1) = (r["rows"] for r in results)
  assert (a0, a1, b0, b1) == (0, BATCH // 2, BATCH // 2, BATCH), layout  # disjoint, covering

  data = mixture.open_source("", spec, seq_len=SEQ_LEN, val_fraction=0.1, vocab_size=1 << 16)
  it = data.train_iterator(BATCH, SEED, (0, BATCH))
  single = np.stack(
    [next(it)["inputs"] for _ in range(3)]
    + [b["inputs"] for b in data.eval_batches(BATCH, 2, (0, BATCH))]
  )
  np.testing.assert_array_equal(np.concatenate([r["local"] for r in results], axis=1), single)
  for r in results:
    np.testing.assert_array_equal(r["gathered"], single)
