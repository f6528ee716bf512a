r"""Hash Layers (Roller et al. 2021), decoder-only, at Switch-Base size: top-1 by token id.

Every MoE layer routes token s to expert h(id_s), a fixed function of its INPUT token id: no
router parameters, no gate (weight 1), no auxiliary loss. The default table is the random hash
(a keyed integer hash of the id, `model.moe.hash.seed`); the paper's balanced table packs the
training data's unigram counts so each expert gets ~1/E of the tokens. It needs the counts of
the run's tokenizer on its training split, written once into the run's workdir:
  python -m moejax.token_counts --config configs/hash_layers.py:tiny --workdir /tmp/hash_tiny \
      --out /tmp/hash_tiny/token_counts.npy
  python -m moejax.train --config configs/hash_layers.py:tiny --workdir /tmp/hash_tiny \
      --config.model.moe.hash.table=balanced \
      --config.model.moe.hash.token_counts=/tmp/hash_tiny/token_counts.npy
(the packed table is part of the checkpoint; evaluation and generation rebuild it from the same
file).

Top-1 with the capacity dispatch is causal in the 'sequence' layout (a token's slot depends only
on earlier tokens), so the Switch settings stay: same sizes, capacity factor 1.25 (eval 2.0) and
active compute as switch_base. Zipfian token frequencies make the random table's load uneven:
watch layer_*/expert_load and dropped_fraction.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/hash_layers.py --workdir /tmp/hash
CPU-sized member, same sizes and steps as switch_base:tiny (trains in minutes on 2 cores):
  python -m moejax.train --config configs/hash_layers.py:tiny --workdir /tmp/hash_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/hash_layers.py")
  c.model.moe.router = "hash"
  c.model.moe.hash.table = "random"
  return c
