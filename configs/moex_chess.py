r"""MoE-X (Yang et al. 2025) on chess games: 8 ReLU experts, top-2, sparsity-aware routing.

CPU-sized (preset `cpu`, see moejax/chess_recipes.py) and the paper's size (no preset):
  python -m moejax.train --config configs/moex_chess.py:cpu --workdir /tmp/moex_scratch
Sparse-upcycled from the dense ReLU chess model, as the paper's headline model:
  python -m moejax.train --config configs/dense.py:chess_relu_cpu --workdir /tmp/dense_relu
  python -m moejax.train --config configs/moex_chess.py:cpu --workdir /tmp/moex_upcycled \
      --config.init.from_dense=/tmp/dense_relu --config.init.from_dense_noise=0.01 \
      --config.model.moe.d_expert=1024
(the experts are copies of the dense d_ff-wide MLP, so upcycling needs d_expert = d_ff, at twice
 the active parameters; the noise breaks the copies' tie, which moex alone never does; see
 docs/MOEX.md.)
Interpretability metrics: python -m moejax.interpret --workdir /tmp/moex_scratch --layer 2
"""

from moejax import chess_recipes


def get_config(preset: str = ""):
  return chess_recipes.chess_family(preset, "moex", "configs/moex_chess.py")
