"""An imported Hugging Face model trains on in moejax and restores onto another mesh.

The Mixtral fixture (tests/fixtures/hf/mixtral) is imported onto the {data 2, expert 4} mesh;
`train.run` on that run directory resumes from the imported step 0 (its parameters, fresh AdamW
moments) on a prepared corpus whose tokenizer has the model's 96 ids, and 20 steps lower the loss.
The trained checkpoint then restores onto an 8-way data mesh with the same logits.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import restore, train
from moejax.data import prepare
from moejax.hf import convert
from tests import prepared_corpus

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "mixtral")
WORDS = 94  # the number tokenizer's words; + "</s>" and "<unk>" = the fixture's vocab of 96


def _counting_corpus(tmp_path) -> str:
  """Documents counting up by 3 (mod WORDS) from random starts: learnable in a few steps."""
  rng = np.random.default_rng(0)
  documents = []
  for _ in range(300):
    start, length = int(rng.integers(WORDS)), int(rng.integers(20, 40))
    documents.append([(start + 3 * j) % WORDS for j in range(length)])
  tokenizer = prepared_corpus.number_tokenizer(tmp_path / "tokenizer.json", WORDS)
  source = prepared_corpus.write_jsonl(tmp_path / "text", documents)
  out = str(tmp_path / "prepared")
  prepare.prepare(source, out, tokenizer=tokenizer, eos_token="</s>", log=lambda *a: None)
  return out


def _logits(workdir, cfg, mesh_overrides, tokens, step):
  mesh, rules = restore.make_inference_mesh(cfg, mesh_overrides=mesh_overrides)
  model = restore.restore_model(workdir, cfg, mesh, rules, step=step)
  forward = lambda params, rest, x: nnx.merge(model.graphdef, params, rest)(x, train=False)[0]
  with jax.set_mesh(mesh):  # jitted as every command runs it (shard_maps inside)
    logits = jax.jit(forward)(model.params, model.model_state, jnp.asarray(tokens))
  return np.asarray(logits), jax.device_get(model.params)


def test_imported_model_trains_and_restores_on_another_mesh(tmp_path):
  workdir = str(tmp_path / "run")
  convert.import_model(FIXTURE, workdir, {"data": 2, "expert": 4})
  cfg = restore.load_run_config(workdir)
  cfg.data.source = f"prepared:{_counting_corpus(tmp_path)}"
  t = cfg.train
  t.steps, t.batch_size, t.seq_len = 20, 8, 16
  t.log_every, t.eval_every, t.checkpoint_every = 1, 20, 20
  cfg.data.eval_batches = 1
  cfg.model.moe.group_size = 16
  cfg.optim.learning_rate, cfg.optim.warmup_steps = 3e-3, 2
  for axis, size in {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}.items():
    cfg.mesh[axis] = size

  summary = train.run(cfg, workdir, progress=False)
  losses = [summary["losses"][s] for s in range(1, 21)]  # resumed at the imported step 0
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses

  tokens = np.random.default_rng(1).integers(0, 96, (8, 16), dtype=np.int32)
  trained, params = _logits(workdir, cfg, {"data": 2, "expert": 4}, tokens, 20)
  other, _ = _logits(workdir, cfg, {"data": 8}, tokens, 20)
  np.testing.assert_allclose(other, trained, atol=1e-5, rtol=0)
  # Training went on from the imported weights (small updates), not from a fresh init.
  _, imported = _logits(workdir, cfg, {"data": 8}, tokens, 0)
  change = np.linalg.norm(params["embed"] - imported["embed"]) / np.linalg.norm(imported["embed"])
  assert 0 < change < 0.3, change
