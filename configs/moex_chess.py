r"""MoE-X (Yang et al. 2025) on chess games, and the experiment's baselines (docs/MOEX.md).

Presets `FFN[_cpu]`: FFN is moex (8 ReLU experts, top-2, sparsity-aware routing; the default),
switch, dense_gelu or dense_relu; `_cpu` is the CPU-sized member (moejax/proj/moex/recipes.py).
  python -m moejax.train --config configs/moex_chess.py:cpu --workdir /tmp/moex_scratch
Sparse-upcycled from the dense ReLU chess model, as the paper's headline model:
  python -m moejax.train --config configs/moex_chess.py:dense_relu_cpu --workdir /tmp/dense_relu
  python -m moejax.train --config configs/moex_chess.py:cpu --workdir /tmp/moex_upcycled \
      --config.init.from_dense=/tmp/dense_relu --config.init.from_dense_noise=0.01 \
      --config.model.moe.d_expert=1024
(the experts are copies of the dense d_ff-wide MLP, so upcycling needs d_expert = d_ff, at twice
 the active parameters; the noise breaks the copies' tie, which moex alone never does; see
 docs/MOEX.md.)
Interpretability metrics: python -m moejax.proj.moex.interpret --workdir /tmp/moex_scratch --layer 2
"""

from moejax.proj.moex import recipes


def get_config(preset: str = ""):
  ffn, size = preset, ""
  if preset in ("", "cpu"):
    ffn, size = "moex", preset
  elif preset.endswith("_cpu"):
    ffn, size = preset[: -len("_cpu")], "cpu"
  return recipes.chess_family(size, ffn, "configs/moex_chess.py")
