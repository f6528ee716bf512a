"""Chess data: the 32-character vocabulary, cached game generation, board-state labels."""

import os
import re

import chess
import numpy as np
import pytest

from moejax.data import chess as chess_data
from moejax.data import chess_board

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
  games = chess_data.load_games(spec, chunk_size=4, processes=1, directory=str(tmp_path),
                                progress=False)  # fmt: skip
  assert len(games) == 10 and games[9] == chess_data.random_game(9, seed=1)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 3
  for name in files[:2]:  # an interrupted run: two chunks missing, made again by 2 workers
    os.remove(tmp_path / name)
  again = chess_data.load_games(spec, chunk_size=4, processes=2, directory=str(tmp_path),
                                progress=False)  # fmt: skip
  assert again == games and sorted(os.listdir(tmp_path)) == files


def test_bad_specs_and_missing_engine_give_clear_errors(monkeypatch):
  with pytest.raises(chess_data.ChessDataError, match="chess:KIND:NUM_GAMES"):
    chess_data.parse_spec("chess:lichess:10")
  monkeypatch.setattr(chess_data.shutil, "which", lambda *a, **k: None)
  with pytest.raises(chess_data.ChessDataError, match="apt-get install stockfish"):
    chess_data.load_games(chess_data.parse_spec("chess:stockfish:4"))
