"""The "chess:" data source: PGN games as characters (registered with the core data pipeline).

`data.source = "chess:KIND:NUM_GAMES[:SEED]"` (moejax/proj/moex/chess.py) trains on games split
by game (held-out games are whole), each side packed like a corpus, with the fixed 32-character
vocabulary instead of a sentencepiece model. Evaluation on text files reads one movetext per
line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moejax.data import pipeline
from moejax.proj.moex import chess


def build(source: str, data_cfg, *, workdir: str, vocab_size: int, seq_len: int):
  """Games split by game, each side packed into blocks of seq_len + 1 characters."""
  del workdir, vocab_size  # no tokenizer file; the vocabulary floor is checked by the pipeline
  tokenizer = chess.CharTokenizer()
  games = chess.load_games(chess.parse_spec(source))
  train_games, val_games = chess.split_games(games, data_cfg.val_fraction)
  train_blocks = pipeline.pack_blocks(chess.encode_games(train_games), seq_len)
  val_blocks = pipeline.pack_blocks(chess.encode_games(val_games), seq_len)
  if not len(train_blocks) or not len(val_blocks):
    raise chess.ChessDataError(
      f"{source!r} gives {len(train_blocks)} train and {len(val_blocks)} val blocks of "
      f"{seq_len}+1 characters: ask for more games"
    )
  return pipeline.Dataset(
    tokenizer, train_blocks, val_blocks, pipeline.unigram_entropy(train_blocks)
  )


def encode_documents(documents: Sequence[str], tokenizer) -> np.ndarray:
  """Games given as text, one PGN movetext per line (';' before each added where missing), as
  the character ids a chess run trains on."""
  del tokenizer
  games = []
  for document in documents:
    for line in document.splitlines():
      line = line.strip()
      if line:
        games.append(line if line.startswith(chess.SEPARATOR) else chess.SEPARATOR + line)
  try:
    return chess.encode_games(games)
  except ValueError as e:
    raise chess.ChessDataError(
      f"{e}: a chess run evaluates games, one movetext per line, e.g. ';1.e4 e5 2.Nf3 Nc6'"
    ) from None


SOURCE_KIND = pipeline.SourceKind(
  build=build,
  run_tokenizer=lambda source, workdir: chess.CharTokenizer(),
  encode_documents=encode_documents,
  min_vocab_size=chess.CharTokenizer.vocab_size,
)
