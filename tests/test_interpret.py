"""End to end on a tiny chess run: train a few steps on random games with `moex` routing, then
`python -m moejax.interpret` on a dense and an MoE layer."""

import json
import os

import numpy as np
import pytest

from moejax import interpret, train
from moejax.data import chess as chess_data
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def chess_run(tmp_path_factory):
  os.environ["MOEJAX_CHESS_CACHE"] = str(tmp_path_factory.mktemp("games"))
  cfg = tiny_config("chess:random:40")
  m, moe = cfg.model, cfg.model.moe
  m.vocab_size, m.activation = 32, "relu"
  moe.router, moe.top_k, moe.dispatch = "moex", 2, "dropless"
  moe.group_layout, moe.group_size = "position", cfg.train.batch_size
  cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 2, 2, 2
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = train.run(cfg, workdir, progress=False)
  yield workdir, cfg, summary
  del os.environ["MOEJAX_CHESS_CACHE"]


def test_chess_run_trains_on_the_character_vocabulary(chess_run):
  _, _, summary = chess_run
  losses = list(summary["losses"].values())
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert losses[0] < np.log(32) + 0.5  # near-uniform start over the 32 characters


@pytest.mark.parametrize("layer,ffn", [(0, "dense"), (1, "moe")])
def test_interpret_cli_writes_metrics(chess_run, tmp_path, layer, ffn):
  workdir, cfg, _ = chess_run
  out = tmp_path / "m.json"
  args = ["--workdir", workdir, "--layer", str(layer), "--train-games", "12", "--val-games", "3"]
  result = interpret.main([*args, "--json", str(out)])
  assert json.loads(out.read_text()) == result
  width = cfg.model.d_ff if ffn == "dense" else cfg.model.moe.num_experts * cfg.model.d_ff
  assert result["ffn"] == ffn and result["features"] == width
  # Positions: every move number's '.' inside the context, counted by brute force.
  _, val = chess_data.split_games(
    chess_data.load_games(chess_data.parse_spec(cfg.data.source)), cfg.data.val_fraction
  )
  seq_len = cfg.train.seq_len
  assert result["val_positions"] == sum(g[:seq_len].count(".") for g in val[:3])
  keys = ("coverage", "reconstruction", "fraction_active", "constant_feature_reconstruction")
  for key in keys:
    assert 0.0 <= result[key] <= 1.0
  if ffn == "moe":  # top-2 of 4 experts: at most half of z_hat is nonzero
    assert result["fraction_active"] <= 0.5


def test_interpret_refuses_bad_layer(chess_run):
  with pytest.raises(ValueError, match="--layer=7"):
    interpret.main(["--workdir", chess_run[0], "--layer", "7"])
