"""The catalogue of bad inputs: each fails with one clear line, before compiling, leaving
existing checkpoints untouched.

Every case runs `train.run` in a copy of a workdir that already holds a checkpoint and asserts:
the error is a user error (what the CLI prints as `moejax: error: ...`, exit 2), its one-line
message contains the expected text, no XLA compilation happened, and every file under
checkpoints/ is byte-for-byte where it was. docs/TROUBLESHOOTING.md lists the same cases with
their full messages; regenerate its table after changing a message:

  python -m tests.test_bad_inputs
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from collections.abc import Callable

import pytest

from moejax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "TROUBLESHOOTING.md"


@dataclasses.dataclass(frozen=True)
class Case:
  """A bad input: `apply(cfg, tmp)` breaks the config (or files), may return another workdir."""

  name: str
  what: str
  apply: Callable
  expected: str
  devices: int = 1


def _parent(cfg, key):
  *parents, leaf = key.split(".")
  for p in parents:
    cfg = cfg[p]
  return cfg, leaf


def _set(key, value):
  def apply(cfg, tmp):
    node, leaf = _parent(cfg, key)
    node[leaf] = value

  return apply


def _do(*steps):
  def apply(cfg, tmp):
    out = None
    for step in steps:
      out = step(cfg, tmp) or out
    return out

  return apply


def _files(suffix, content: bytes):
  """Points data.source at one new file with `content`."""

  def apply(cfg, tmp):
    path = tmp / f"bad{suffix}"
    path.write_bytes(content)
    cfg.data.source = str(path)

  return apply


def _workdir_under_file(cfg, tmp):
  (tmp / "a_file").write_text("x")
  return str(tmp / "a_file" / "run")


def _workdir_is_file(cfg, tmp):
  (tmp / "plain_file").write_text("x")
  return str(tmp / "plain_file")


def _truncate_every_checkpoint(cfg, tmp):
  for step_dir in (tmp / "run" / "checkpoints").iterdir():
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.stat().st_size > 1000:
        f.write_bytes(f.read_bytes()[:100])


def _mesh(**axes):
  return _do(*[_set(f"mesh.{a}", n) for a, n in axes.items()])


CASES = [
  # --- config keys and types: a locked, typed ConfigDict refuses them where they are written
  # (tests/test_config.py: test_config_is_locked_and_typed and the command-line cases).
  Case(
    "extension-missing",
    "an extension module that cannot be imported",
    _set("extensions", "no_such_module"),
    "extensions: cannot import 'no_such_module'",
  ),
  # --- values
  Case(
    "non-positive-size",
    "a size <= 0",
    _set("model.d_model", 0),
    "model.d_model=0: must be a positive integer",
  ),
  Case(
    "negative-batch",
    "a negative batch size",
    _set("train.batch_size", -4),
    "train.batch_size=-4: must be a positive integer",
  ),
  Case(
    "heads-not-dividing",
    "d_model not divisible by num_heads",
    _set("model.num_heads", 3),
    "model.d_model=64 is not divisible by model.num_heads=3",
  ),
  Case(
    "unknown-router",
    "an unknown router",
    _set("model.moe.router", "swich"),
    "model.moe.router='swich' is not one of: ",
  ),
  Case(
    "unknown-dispatch",
    "an unknown dispatch",
    _set("model.moe.dispatch", "ragged"),
    "model.moe.dispatch='ragged' is not one of: capacity",
  ),
  Case(
    "unknown-activation",
    "an unknown activation",
    _set("model.activation", "tanh"),
    "model.activation='tanh' is not one of: gelu, relu, swiglu",
  ),
  Case(
    "unknown-dtype",
    "an unknown compute dtype",
    _set("model.dtype", "float16"),
    "model.dtype='float16' is not one of: float32, bfloat16",
  ),
  Case(
    "capacity-factor-zero",
    "capacity factor <= 0",
    _set("model.moe.capacity_factor", 0.0),
    "model.moe.capacity_factor=0.0: must be > 0",
  ),
  Case(
    "eval-capacity-negative",
    "eval capacity factor <= 0",
    _set("model.moe.eval_capacity_factor", -1.0),
    "model.moe.eval_capacity_factor=-1.0",
  ),
  Case(
    "top-k-above-experts",
    "top-k > number of experts",
    _set("model.moe.top_k", 5),
    "model.moe.top_k=5 > model.moe.num_experts=4; use top_k in 1..4",
  ),
  Case(
    "group-size-not-dividing",
    "group size not dividing batch * length",
    _set("model.moe.group_size", 100),
    "model.moe.group_size=100 does not divide",
  ),
  Case(
    "base-router-group",
    "BASE router with group size not a multiple of experts",
    _do(_set("model.moe.router", "base"), _set("model.moe.group_size", 2)),
    "model.moe.router='base' needs model.moe.group_size=2 to be a multiple of",
  ),
  Case(
    "moex-upcycle-exact-copies",
    "MoE-X upcycled from exact copies (they can never diverge)",
    _do(_set("init.from_dense", "/tmp/dense_run"), _set("model.moe.router", "moex")),
    "the experts start as exact copies that moex cannot tell apart",
  ),
  Case(
    "noncausal-router",
    "a router that sees later tokens in sequence groups",
    _set("model.moe.router", "expert_choice"),
    "leaks the future in a decoder",
  ),
  Case(
    "position-groups",
    "position groups larger than the batch",
    _do(_set("model.moe.group_layout", "position"), _set("model.moe.group_size", 16)),
    "must divide train.batch_size=8 with model.moe.group_layout='position'",
  ),
  Case(
    "val-fraction",
    "validation fraction outside (0, 1)",
    _set("data.val_fraction", 1.5),
    "data.val_fraction=1.5: must be in (0, 1)",
  ),
  Case(
    "learning-rate",
    "learning rate <= 0",
    _set("optim.learning_rate", 0.0),
    "optim.learning_rate=0.0: must be > 0",
  ),
  Case(
    "warmup-negative",
    "negative warmup",
    _set("optim.warmup_steps", -1),
    "optim.warmup_steps=-1: must be >= 0 (0 = off)",
  ),
  Case(
    "router-option",
    "a router option its family refuses",
    _set("model.moe.switch.jitter_eps", 1.5),
    "model.moe.switch.jitter_eps=1.5: must be in [0, 1)",
  ),
  Case(
    "nonfinite-policy",
    "unknown non-finite policy",
    _set("train.nonfinite_policy", "ignore"),
    "train.nonfinite_policy='ignore' is not one of: halt, skip",
  ),
  Case(
    "poison-step-negative",
    "negative test-hook step",
    _set("train.debug_poison_step", -1),
    "train.debug_poison_step=-1: must be a positive integer",
  ),
  Case(
    "decode-policy",
    "unknown decode-error policy",
    _set("data.decode_errors", "replace"),
    "data.decode_errors='replace' is not one of: fail, skip",
  ),
  Case(
    "vocab-below-tokenizer",
    "vocabulary smaller than the tokenizer's byte pieces",
    _set("model.vocab_size", 100),
    "model.vocab_size=100 is below the tokenizer's floor of 260",
  ),
  # --- mesh
  Case(
    "mesh-two-fill-axes",
    "two mesh axes set to -1",
    _mesh(data=-1, expert=-1),
    "mesh: at most one axis may be -1",
  ),
  Case("mesh-zero-axis", "a mesh axis of size 0", _mesh(fsdp=0), "mesh.fsdp=0: must be a positive"),
  Case(
    "mesh-not-dividing",
    "fixed axes whose product does not divide the devices",
    _mesh(data=-1, expert=3),
    "which does not divide the 8 available",
    devices=8,
  ),
  Case(
    "mesh-wrong-product",
    "fixed axes that need more devices than exist",
    _mesh(data=4, expert=4),
    "needs 16 devices but 8 are available",
    devices=8,
  ),
  Case(
    "experts-vs-expert-axis",
    "experts not divisible by the expert axis",
    _do(_mesh(data=1, expert=8)),
    "model.moe.num_experts=4 is not divisible by mesh.expert=8",
    devices=8,
  ),
  Case(
    "batch-vs-devices",
    "batch not divisible by the devices it is split over",
    _do(_mesh(data=-1), _set("train.batch_size", 12), _set("model.moe.group_size", 32)),
    "train.batch_size=12 is not divisible by the 8 devices",
    devices=8,
  ),
  Case(
    "mesh-rule-axis",
    "a sharding rule naming an unknown mesh axis",
    _set("mesh.rules.batch", "data,pod"),
    "mesh.rules.batch='data,pod': unknown mesh axes",
  ),
  # --- data
  Case(
    "glob-no-match",
    "a data glob that matches no file",
    lambda c, tmp: setattr(c.data, "source", str(tmp / "nothing" / "*.txt")),
    "matches no file",
  ),
  Case("empty-source", "an empty data.source", _set("data.source", " , "), "is empty: use"),
  Case(
    "empty-corpus",
    "files that hold only whitespace",
    _files(".txt", b"  \n\n"),
    "all are empty: point it at files that contain text",
  ),
  Case(
    "unsupported-extension",
    "a file type that is not .txt/.jsonl",
    _files(".csv", b"a,b\n"),
    "has an unsupported extension",
  ),
  Case(
    "jsonl-not-json",
    "a .jsonl line that is not JSON",
    _files(".jsonl", b'{"text": "a"}\nnope\n'),
    ":2 is not valid JSON",
  ),
  Case(
    "jsonl-missing-field",
    "a .jsonl record without the text field",
    _files(".jsonl", b'{"body": "a"}\n'),
    "has no string field 'text' (found ['body'])",
  ),
  Case(
    "undecodable-bytes",
    "a text file that is not UTF-8 (policy 'fail')",
    _files(".txt", "caf\u00e9 ".encode("latin-1") * 100),
    "is not UTF-8 text (byte b'\\xe9' at offset 3)",
  ),
  Case(
    "sequence-longer-than-corpus",
    "train.seq_len too long for the corpus",
    _do(_set("train.seq_len", 2048), _set("train.memory_limit_gib", 1000.0)),
    "use a smaller train.seq_len, more data",
  ),
  Case(
    "memory-preflight",
    "a config that does not fit the device's memory",
    _set("train.memory_limit_gib", 1e-4),
    "memory pre-flight: this config needs",
  ),
  # --- workdir and checkpoints
  Case(
    "workdir-is-file", "--workdir that is a file", _workdir_is_file, "is a file, not a directory"
  ),
  Case(
    "workdir-url-without-backend",
    "a gs:// workdir without the package that reaches buckets",
    lambda cfg, tmp: "gs://no-such-bucket/run",
    "gs:// paths need the gcsfs package",
  ),
  Case(
    "workdir-not-writable",
    "--workdir that cannot be created or written",
    _workdir_under_file,
    "is not writable (Not a directory)",
  ),
  Case(
    "no-readable-checkpoint",
    "every checkpoint of the workdir is damaged (nothing is moved; the run does not start afresh)",
    _truncate_every_checkpoint,
    "can be read (step 1: ",
  ),
  Case(
    "incompatible-checkpoint",
    "a workdir holding a checkpoint of another model",
    _set("model.d_model", 128),
    "differing keys: model.d_model 64 -> 128",
  ),
]


# ------------------------------------------------------------------ harness


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
  """A workdir with a checkpoint at step 1 (and the corpus it was trained on)."""
  import jax

  from moejax import train
  from tests.helpers import tiny_config, write_corpus

  base = tmp_path_factory.mktemp("seeded")
  corpus = write_corpus(base, num_files=2, words_per_file=3000)
  workdir = base / "run"
  train.run(
    tiny_config(corpus, data=1), str(workdir), devices=jax.devices()[:1], progress=False, stop_at=1
  )
  assert (workdir / "checkpoints" / "1").is_dir()
  return corpus, workdir


def _snapshot(directory: pathlib.Path) -> dict:
  return {
    str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def run_case(case: Case, corpus: str, seeded_workdir: pathlib.Path, tmp: pathlib.Path) -> str:
  """Runs one case; returns its error message after checking the invariants."""
  import jax

  from moejax import train
  from tests.helpers import tiny_config

  workdir = tmp / "run"
  shutil.copytree(seeded_workdir, workdir)
  cfg = tiny_config(corpus, data=1 if case.devices == 1 else -1)
  workdir = case.apply(cfg, tmp) or str(workdir)
  before = _snapshot(tmp / "run" / "checkpoints")  # after the case damaged it, if it does
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(errors.UserError) as err:  # what the CLI turns into exit 2
      train.run(cfg, workdir, devices=jax.devices()[: case.devices], progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  message = str(err.value)
  assert case.expected in message, message
  assert "\n" not in message, message
  assert not compiles, f"compiled before failing: {compiles}"
  assert _snapshot(tmp / "run" / "checkpoints") == before
  return message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, seeded, tmp_path):
  run_case(case, *seeded, tmp_path)


def test_catalogue_is_big_and_documented():
  assert len(CASES) >= 30
  assert len({c.name for c in CASES}) == len(CASES)
  doc = DOC.read_text()
  for case in CASES:
    assert f"`{case.name}`" in doc, f"docs/TROUBLESHOOTING.md lacks {case.name}; regenerate it"
    assert case.expected in doc, f"docs/TROUBLESHOOTING.md has an old message for {case.name}"


def test_undecodable_bytes_skipped_by_policy(tmp_path, caplog):
  from moejax.data import sources

  (tmp_path / "good.txt").write_text("hello world")
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
  (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  docs = sources.load_documents(str(tmp_path / "*"), decode_errors="skip")
  assert docs == ["hello world", "ok"]
  assert "skipped 2 undecodable" in caplog.text


# ------------------------------------------------------------------ docs/TROUBLESHOOTING.md

BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def _table(rows) -> str:
  cell = lambda s: s.replace("|", "\\|")
  lines = ["| case | what | message |", "|---|---|---|"]
  lines += [f"| `{name}` | {cell(what)} | {cell(msg)} |" for name, what, msg in rows]
  return "\n".join(lines)


if __name__ == "__main__":  # rewrites the table between the markers of docs/TROUBLESHOOTING.md
  import tempfile

  import tests.conftest  # noqa: F401 - 8 CPU devices
  from moejax import train
  from tests.helpers import tiny_config, write_corpus

  rows = []
  with tempfile.TemporaryDirectory() as tmp_root:
    root = pathlib.Path(tmp_root)
    corpus = write_corpus(root, num_files=2, words_per_file=3000)
    import jax

    train.run(
      tiny_config(corpus, data=1),
      str(root / "seed"),
      devices=jax.devices()[:1],
      progress=False,
      stop_at=1,
    )
    for i, case in enumerate(CASES):
      tmp = root / f"case{i}"
      tmp.mkdir()
      message = run_case(case, corpus, root / "seed", tmp)
      rows.append((case.name, case.what, message.replace(tmp_root, "<tmp>")))
  doc = DOC.read_text()
  head, rest = doc.split(BEGIN)
  DOC.write_text(f"{head}{BEGIN}\n{_table(rows)}\n{END}{rest.split(END)[1]}")
