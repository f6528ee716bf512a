"""End to end on a tiny chess run: train a few steps on random games with `moex` routing, then
`python -m moejax.proj.moex.interpret` on a dense and an MoE layer."""

import json
import os

import numpy as np
import pytest

from moejax import evaluate, generate, train
from moejax.proj.moex import chess as chess_data
from moejax.proj.moex import interpret
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def chess_run(tmp_path_factory):
  os.environ["MOEJAX_CHESS_CACHE"] = str(tmp_path_factory.mktemp("games"))
  cfg = tiny_config("chess:random:40")
  cfg.extensions = "moejax.proj.moex"
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


def test_evaluate_data_on_the_held_out_games_equals_the_run_validation(chess_run, tmp_path):
  """A chess run has no tokenizer.model: `evaluate --data` reads games (one per line, the ';'
  optional) with the character vocabulary, so the held-out games as a file give the same loss
  as the run's own validation split."""
  workdir, cfg, _ = chess_run
  _, val = chess_data.split_games(
    chess_data.load_games(chess_data.parse_spec(cfg.data.source)), cfg.data.val_fraction
  )
  path = tmp_path / "games.txt"
  path.write_text("\n".join(g.lstrip(";") if i % 2 else g for i, g in enumerate(val)) + "\n")
  own = evaluate.main(["--workdir", workdir, "--batches", "1"])
  given = evaluate.main(["--workdir", workdir, "--batches", "1", "--data", str(path)])
  assert given["tokens"] == own["tokens"] > 0
  assert given["loss"] == pytest.approx(own["loss"], abs=1e-6)
  bad = tmp_path / "bad.txt"
  bad.write_text("1.e4 e5 2.Nf3 Nc6 {a comment}\n")
  with pytest.raises(ValueError, match="one movetext per line"):
    evaluate.main(["--workdir", workdir, "--data", str(bad)])


def test_generate_continues_a_game_in_the_chess_vocabulary(chess_run):
  workdir, _, _ = chess_run
  args = ["--workdir", workdir, "--max_new_tokens", "12", "--temperature", "0"]
  texts = generate.main([*args, "--prompt", ";1.e4 e5 2."])
  assert texts[0].startswith(";1.e4 e5 2.") and len(texts[0]) > len(";1.e4 e5 2.")
  assert set(texts[0]) <= set(chess_data.VOCAB)
  with pytest.raises(ValueError, match="not in the chess vocabulary"):
    generate.main(["--workdir", workdir, "--prompt", "1.e4 {x}"])
