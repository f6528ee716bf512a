r"""Dense baseline of the Switch-Base family: the same trunk with a dense MLP in every layer.

Equal compute: a top-1 MoE layer sends each token through one expert MLP of width
d_expert = d_ff, so this dense model has the same active parameters and FLOPs per token as
configs/switch_base.py (and its `tiny` preset as switch_base:tiny: 4 layers, d_model 256,
d_ff 512, vocab 2048, 600 steps of 16 x 128 tokens), minus the negligible router matmuls.
It is also the starting point of sparse upcycling (moejax/upcycle.py, Komatsuzaki et al. 2022):

  python -m moejax.train --config configs/dense.py:tiny --workdir /tmp/dense_tiny
  python -m moejax.train --config configs/switch_base.py:tiny --workdir /tmp/upcycled_tiny \
      --config.init.from_dense=/tmp/dense_tiny

Full size (needs accelerators):
  python -m moejax.train --config configs/dense.py --workdir /tmp/dense
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/dense.py")
  c.model.moe_every = 0  # no MoE layer: every block's feed-forward is a dense MLP of width d_ff
  return c
