"""Chess data: the 32-character vocabulary, cached game generation, board-state labels."""

import os
import re

import chess
import numpy as np
import pytest

from moejax.proj.moex import chess as chess_data
from moejax.proj.moex import chess_board

PIECES = "PNBRQKpnbrqk"


def test_vocabulary_round_trip_and_size():
  game = chess_data.random_game(3)
  tok = chess_data.CharTokenizer()
  assert tok.vocab_size == 32 == len(set(chess_data.VOCAB))
  ids = chess_data.encode_games([game])
  assert ids.tolist() == tok.encode(game) and tok.decode(ids) == game
  with pytest.raises(ValueError, match="not in the chess vocabulary"):
    chess_data.encode_games([";1.e4 {comment}"])


def test_movetext_is_a_legal_replayable_game():
  game = chess_data.random_game(7, max_plies=40)
  assert re.fullmatch(r";1\.\S+( \S+)*", game)
  board = chess.Board()
  for token in game[1:].split(" "):
    board.push_san(token.split(".")[-1])  # raises on an illegal move
  assert len(board.move_stack) == 40 or board.is_game_over()


def test_board_labels_match_python_chess_replay():
  for index in range(3):
    game = chess_data.random_game(index, max_plies=60)
    positions, labels = chess_board.board_labels(game)
    assert [i for i, ch in enumerate(game) if ch == "."] == positions.tolist()
    for pos, label in zip(positions, labels, strict=True):
      # Reference: replay the moves written before this '.' on a fresh board.
      prefix = game[1 : pos + 1]  # up to and including this move number
      board = chess.Board()
      for san in re.sub(r"\d+\.", " ", prefix).split():
        board.push_san(san)
      assert board.turn == chess.WHITE
      want = np.zeros((8, 8, 12), bool)
      for square in range(64):
        piece = board.piece_at(square)
        if piece is not None:
          want[square // 8, square % 8, PIECES.index(piece.symbol())] = True
      np.testing.assert_array_equal(label, want)


def test_games_are_cached_by_chunk_and_resumable(tmp_path):
  spec = chess_data.parse_spec("chess:random:10:1")
  games = chess_data.load_games(
    spec, chunk_size=4, processes=1, directory=str(tmp_path), progress=False
  )
  assert len(games) == 10 and games[9] == chess_data.random_game(9, seed=1)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 3
  for name in files[:2]:  # an interrupted run: two chunks missing, made again by 2 workers
    os.remove(tmp_path / name)
  again = chess_data.load_games(
    spec, chunk_size=4, processes=2, directory=str(tmp_path), progress=False
  )
  assert again == games and sorted(os.listdir(tmp_path)) == files


def test_bad_specs_and_missing_engine_give_clear_errors(monkeypatch):
  with pytest.raises(chess_data.ChessDataError, match="chess:KIND:NUM_GAMES"):
    chess_data.parse_spec("chess:lichess:10")
  monkeypatch.setattr(chess_data.shutil, "which", lambda *a, **k: None)
  with pytest.raises(chess_data.ChessDataError, match="apt-get install stockfish"):
    chess_data.load_games(chess_data.parse_spec("chess:stockfish:4"))


def _load_recipe(path, preset):
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location("cfg", root / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.parametrize("size", ["", "_cpu"])
def test_chess_recipes_have_equal_active_ffn_width_and_validate(size):
  from moejax import config_lib  # noqa: PLC0415

  active_width, trunks = {}, set()
  for name in ("dense_gelu", "dense_relu", "switch", "moex"):
    c = _load_recipe("configs/moex_chess.py", f"{name}{size}")
    assert c.extensions == "moejax.proj.moex"
    m, moe = c.model, c.model.moe
    config_lib.validate(c, 1)
    trunks.add((m.num_layers, m.d_model, m.num_heads, c.train.seq_len, c.data.source, m.vocab_size))
    # Hidden units a token runs through per layer: d_ff for dense, top_k * d_expert for MoE.
    active_width[name] = m.d_ff if m.moe_every == 0 else moe.top_k * moe.d_expert
    assert m.activation == ("gelu" if name in ("dense_gelu", "switch") else "relu")
  assert len(trunks) == 1 and len(set(active_width.values())) == 1
  if size == "":  # the paper's chess size
    assert trunks.pop()[:4] == (8, 512, 8, 1023)


def test_chess_source_in_the_pipeline(tmp_path, monkeypatch):
  from moejax import config_lib, errors  # noqa: PLC0415
  from moejax.data import pipeline  # noqa: PLC0415

  monkeypatch.setenv("MOEJAX_CHESS_CACHE", str(tmp_path))
  data_cfg = config_lib.default_config().data
  data_cfg.source, data_cfg.val_fraction = "chess:random:10", 0.2
  with pytest.raises(errors.ConfigError, match="below the tokenizer's floor of 32"):
    pipeline.check_source(data_cfg.source, vocab_size=16)
  data = pipeline.build_dataset(data_cfg, workdir=str(tmp_path), vocab_size=32, seq_len=64)
  games = chess_data.load_games(chess_data.parse_spec("chess:random:10"), progress=False)
  train, val = chess_data.split_games(games, 0.2)
  assert len(val) == 2 and val == [games[4], games[9]]
  tok = data.tokenizer
  # Blocks are the packed character streams of each side, in order.
  assert tok.decode(data.train_blocks[0]) == "".join(train)[:65]
  assert tok.decode(data.val_blocks.reshape(-1)) == "".join(val)[: data.val_blocks.size]
  assert data.train_blocks.max() < 32


# Stockfish is an optional Debian package, not a pip requirement; the error without it is tested
# above (test_bad_specs_and_missing_engine_give_clear_errors).
@pytest.mark.skipif(
  not chess_data.shutil.which("stockfish", path="/usr/games:/usr/bin"),
  reason="optional engine not installed: apt-get install stockfish",
)
def test_stockfish_games_are_legal():
  for game in chess_data.stockfish_games(range(2), opening_plies=4, max_plies=40):
    board = chess.Board()
    for token in game[1:].split(" "):
      board.push_san(token.split(".")[-1])
    assert len(board.move_stack) == 40 or board.is_game_over()
