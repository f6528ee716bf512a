"""Board-state labels of PGN movetext, aligned to character positions (for board probing).

At each '.' that follows a move number, white is to move; the label there is the board after all
moves before it, as an 8x8x12 one-hot: [rank, file, piece], rank 0 = rank 1 (white's side),
file 0 = the a-file, piece = white P N B R Q K (0..5) then black p n b r q k (6..11). These are
the 768 binary "board-state properties" of Karvonen et al. (2024) that MoE-X's metrics use.
"""

from __future__ import annotations

import numpy as np

from moejax.proj.moex import chess as chess_data

NUM_PROPERTIES = 8 * 8 * 12


def board_one_hot(board) -> np.ndarray:
  """bool[8, 8, 12] piece-on-square one-hot of a python-chess Board (square = rank * 8 + file)."""
  import chess  # noqa: PLC0415

  planes = []
  for color in (chess.WHITE, chess.BLACK):
    for piece_type in range(chess.PAWN, chess.KING + 1):
      mask = board.pieces_mask(piece_type, color).to_bytes(8, "little")
      planes.append(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little"))
  return np.stack(planes, axis=-1).reshape(8, 8, 12).astype(bool)


def board_labels(game: str) -> tuple[np.ndarray, np.ndarray]:
  """Labels of one game string ';1.e4 e5 2.Nf3 ...'.

  Returns:
    positions: int32[P] character index of each move number's '.' (white to move).
    labels: bool[P, 8, 8, 12] the board at that character, replayed with python-chess.
  """
  import chess  # noqa: PLC0415

  if not game.startswith(chess_data.SEPARATOR):
    raise ValueError(f"a game starts with {chess_data.SEPARATOR!r}: {game[:20]!r}")
  board = chess.Board()
  positions, labels = [], []
  offset = len(chess_data.SEPARATOR)
  for token in game[offset:].split(" "):
    san = token
    if "." in token:
      dot = token.index(".")
      positions.append(offset + dot)
      labels.append(board_one_hot(board))
      san = token[dot + 1 :]
    if san:
      board.push_san(san)
    offset += len(token) + 1
  if not labels:
    return np.zeros([0], np.int32), np.zeros([0, 8, 8, 12], bool)
  return np.asarray(positions, np.int32), np.stack(labels)
