r"""Switch Transformer (Fedus et al. 2021), decoder-only: Switch-Base sizes, top-1 routing.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/switch_base.py --workdir /tmp/switch_base
CPU-sized member of the same family (trains in minutes on 2 cores):
  python -m moejax.train --config configs/switch_base.py:tiny --workdir /tmp/switch_tiny
Chess presets of the MoE-X experiment (docs/MOEX.md): `chess` (paper size) and `chess_cpu`.
"""

from moejax import chess_recipes, config_lib


def get_config(preset: str = ""):
  if preset in ("chess", "chess_cpu"):
    return chess_recipes.chess_family(preset[6:], "switch", "configs/switch_base.py")
  return config_lib.switch_base_family(preset, "configs/switch_base.py")
