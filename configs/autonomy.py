r"""Autonomy-of-Experts (Lv et al. 2025), decoder-only, at Switch-Base size: top-1, no router.

Each expert's gate projection is factorised, W_g = W_down W_up (rank d_low); every expert
computes ||x W_down|| and each token takes the expert with the largest softmax of these norms.
Expert e = (SiLU(x W_down W_up) * (x W_p)) W_o, with W_p and W_o the expert bank's two matrices
(GELU trunk: the bank has no gate branch of its own).

Equal parameters, not equal compute: d_expert shrinks so that D*d_low + d_low*F + 2*D*F equals
a Switch expert's 2*D*d_ff (tiny: d_low 32, F 464, 0.6% fewer parameters; full: d_low 128,
F 2776). Every expert's [D, d_low] projection runs on every token for the selection: per token
D*E*d_low extra multiply-adds (tiny: 65k, a quarter of one expert), the price of "no router".

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/autonomy.py --workdir /tmp/autonomy
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/autonomy.py:tiny --workdir /tmp/autonomy_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/autonomy.py")
  m, moe = c.model, c.model.moe
  moe.router, moe.top_k = "autonomy", 1
  d_low = 32 if preset == "tiny" else 128
  moe.autonomy.d_low = d_low
  # Same parameters as a GELU expert of width d_ff, rounded down to a multiple of 8.
  width = (2 * m.d_model * m.d_ff - m.d_model * d_low) // (d_low + 2 * m.d_model)
  moe.d_expert = width // 8 * 8
  return c
