"""Checkpoints of scanned and per-layer models restore into each other (model/layout.py): the
training resume path, inference restore and the pure tree conversion."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import restore, train
from moejax.model import layout
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus, scan):
  cfg = tiny_config(corpus, data=2, expert=4)
  cfg.model.num_layers = 4  # two units of [dense, MoE]
  cfg.model.moe.router = "deepseek"  # carries non-parameter state (the balance bias)
  cfg.model.moe.top_k, cfg.model.moe.group_layout, cfg.model.moe.group_size = 2, "position", 4
  cfg.model.scan_layers = scan
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_every = 6, 3, 6
  return cfg


def test_resume_a_per_layer_checkpoint_with_scanned_layers_and_back(corpus, tmp_path):
  """Steps 4-6 resumed in the other layout equal the straight per-layer run (parameters,
  optimizer moments and the router bias are restacked); then a scanned checkpoint restores
  for inference into a per-layer model with the same logits."""
  straight = train.run(_cfg(corpus, False), str(tmp_path / "straight"), progress=False)
  workdir = str(tmp_path / "switched")
  train.run(_cfg(corpus, False), workdir, progress=False, stop_at=3)
  resumed = train.run(_cfg(corpus, True), workdir, progress=False)
  assert min(resumed["losses"]) == 4
  for step in range(4, 7):
    np.testing.assert_allclose(resumed["losses"][step], straight["losses"][step], atol=1e-5)
  state = resumed["state"]
  assert state["params"]["stack"][1]["ffn"]["experts"]["w_in"].shape[0] == 2
  assert state["model_state"]["stack"][1]["ffn"]["router"]["bias"].shape == (2, 4)

  # The scanned run's step-6 checkpoint, restored for inference into a per-layer model.
  per_layer_cfg = restore.load_run_config(workdir)
  per_layer_cfg.model.scan_layers = False
  mesh, rules = restore.make_inference_mesh(per_layer_cfg)
  model = restore.restore_model(workdir, per_layer_cfg, mesh, rules)
  assert model.step == 6 and "blocks" in model.params
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (8, 32)), jnp.int32)
  with jax.set_mesh(mesh):
    forward = lambda g: jax.jit(lambda p, r, t: nnx.merge(g, p, r)(t, train=False)[0])
    got = forward(model.graphdef)(model.params, model.model_state, tokens)
    graphdef, _, _ = restore.abstract_model(_cfg(corpus, True).model, rules=rules)
    want = forward(graphdef)(state["params"], state["model_state"], tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_layout_conversion_round_trips_params_and_optimizer_trees():
  cfg = tiny_config("unused")
  cfg.model.num_layers, cfg.model.moe_every = 6, 3  # units of [dense, dense, MoE]
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  Moments = collections.namedtuple("Moments", "count mu nu")  # like optax's states
  tree = {"params": params, "opt": (Moments(jnp.zeros(()), params, params), {})}
  stacked = layout.to_layout(tree, layout.STACKED, unit=3)
  assert layout.layout_of(stacked["params"]) == layout.STACKED
  w_in = stacked["opt"][0].mu["stack"][2]["ffn"]["experts"]["w_in"]
  assert w_in.shape == (2, *params["blocks"][5]["ffn"]["experts"]["w_in"].shape)
  np.testing.assert_array_equal(w_in[1], params["blocks"][5]["ffn"]["experts"]["w_in"])
  back = layout.to_layout(stacked, layout.PER_LAYER)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  assert isinstance(back["opt"][0], Moments)
  # The stacked tree is exactly what a scanned model holds.
  cfg.model.scan_layers = True
  scanned = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, stacked["params"], scanned)
