"""The router seam: a new router is one file (routing function, options, registration).

The module below is written to a temporary folder, outside the package; a config file imports it
and the CLI trains it for 3 steps with one of its own options set on the command line. Nothing
else in the repository changes: the family gets its config section `model.moe.<name>` from its
Options, its loss weight from `<loss>_weight`, and its causality and capacity from its class.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

from tests.helpers import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]

ROUTER_MODULE = '''
"""Top-1 routing whose gate is `scale` times the router probability (a test router)."""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.model.routers import base, registry


def route_scaled_top1(logits_se, *, scale):
  num_tokens, num_experts = logits_se.shape
  probs_se = jax.nn.softmax(logits_se.astype(jnp.float32), axis=-1)
  expert_s = jnp.argmax(probs_se, axis=-1).astype(jnp.int32)
  gate_s = jnp.max(probs_se, axis=-1) * scale
  chosen_se = jax.nn.one_hot(expert_s, num_experts)
  return base.SparseRouting(
    token_index=jnp.arange(num_tokens, dtype=jnp.int32),
    expert_index=expert_s,
    combine_weight=gate_s,
    valid=jnp.ones((num_tokens,), bool),
    aux_losses={"spread_loss": num_experts * jnp.sum(jnp.mean(chosen_se, 0) ** 2)},
    metrics={"expert_load": jnp.mean(chosen_se, 0), "option_scale": jnp.float32(scale)},
  )


@dataclasses.dataclass(frozen=True)
class ScaledOptions:
  scale: float = 1.0
  spread_loss_weight: float = 0.0

  def __post_init__(self):
    if self.scale <= 0:
      raise ValueError(f"scale={self.scale}: must be > 0")


@registry.register("scaled_top1")
class ScaledTop1Router(base.TokenChoiceRouter):
  Options = ScaledOptions
  AUX_LOSSES = ("spread_loss",)

  def __init__(self, *, d_model, moe, options, rngs):
    self.num_experts, self.top_k, self.options = moe.num_experts, 1, options
    self.kernel = base.router_kernel(rngs, d_model, moe.num_experts, 0.02)

  def __call__(self, x_gsd, *, train, rng=None):
    logits_gse = base.router_logits(x_gsd, self.kernel[...])
    return base.route_groups(lambda l: route_scaled_top1(l, scale=self.options.scale), logits_gse)
'''

CONFIG_FILE = """
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import scaled_router  # noqa: E402,F401 - registers the family before the config is built

from moejax import config_lib  # noqa: E402


def get_config(preset=""):
  c = config_lib.default_config()
  c.extensions = "scaled_router"
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 512, 2, 64, 4, 128
  moe.router, moe.num_experts, moe.group_size = "scaled_top1", 4, 64
  t.steps, t.batch_size, t.seq_len = 3, 8, 32
  t.log_every = t.eval_every = t.checkpoint_every = 3
  c.data.source, c.data.eval_batches, c.data.val_fraction = {corpus!r}, 1, 0.1
  return c
"""


def _tracked_state():
  return subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True
  ).stdout


def test_a_new_router_file_trains_through_the_cli_with_its_own_option(tmp_path):
  corpus = write_corpus(tmp_path, num_files=2, words_per_file=3000)
  (tmp_path / "scaled_router.py").write_text(textwrap.dedent(ROUTER_MODULE))
  (tmp_path / "config.py").write_text(CONFIG_FILE.format(corpus=corpus))
  before = _tracked_state()
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      str(tmp_path / "config.py"),
      "--workdir",
      str(workdir),
      "--config.model.moe.scaled_top1.scale=0.5",
      "--config.model.moe.scaled_top1.spread_loss_weight=0.25",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _tracked_state() == before  # no file of the repository changed
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  step3 = next(line for line in lines if line["step"] == 3 and "loss" in line)
  assert step3["layer_1/option_scale"] == 0.5  # the command-line option reached the router
  # The loss adds weight * spread_loss (the family's own weight option) to the cross-entropy.
  expected = step3["cross_entropy"] + 0.25 * step3["spread_loss"]
  assert abs(step3["loss"] - expected) < 1e-5 and step3["spread_loss"] >= 1.0
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["moe"]["scaled_top1"] == {"scale": 0.5, "spread_loss_weight": 0.25}
  assert saved["extensions"] == "scaled_router"

  # Its own checks: a bad option value is one line, exit 2, before anything runs.
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      str(tmp_path / "config.py"),
      "--workdir",
      str(tmp_path / "bad"),
      "--config.model.moe.scaled_top1.scale=-1.0",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
    "moejax: error: model.moe.scaled_top1.scale=-1.0: must be > 0"
  ]
