r"""SMEAR (Muqeeth et al. 2023): soft merging of experts, decoder-only, at Switch-Base size.

Every token runs ONE expert whose weights are the router-probability-weighted average of the E
experts' weights: no discrete choice, no capacity, no auxiliary loss. For a decoder the router
input is the running mean of the token's sequence up to it (level 'causal'; the paper's
per-example mean would see the future). Merging per token is computed exactly by mixing the E
experts' pre-activations: E times the expert compute of switch_base ("dense compute"; 8x in the
tiny preset, 128x in the full one, where it is a reference rather than a practical recipe).

The running mean covers the whole sequence whatever model.moe.group_size, in the 'sequence'
layout (the 'position' layout is refused). KV-cache decoding is refused (the running mean is
not cached); evaluation runs full sequences.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/smear.py --workdir /tmp/smear
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/smear.py:tiny --workdir /tmp/smear_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/smear.py")
  moe = c.model.moe
  moe.router, moe.group_layout = "smear", "sequence"
  moe.smear.level = "causal"
  return c
