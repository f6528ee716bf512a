r"""Switch Transformer (Fedus et al. 2021), decoder-only: Switch-Base sizes, top-1 routing.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/switch_base.py --workdir /tmp/switch_base
CPU-sized member of the same family (trains in minutes on 2 cores):
  python -m moejax.train --config configs/switch_base.py:tiny --workdir /tmp/switch_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  return recipes.switch_base_family(preset, "configs/switch_base.py")
