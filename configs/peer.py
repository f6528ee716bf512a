r"""PEER (He 2024): a pool of single-neuron experts retrieved by product keys, Switch-Base trunk.

Every MoE layer holds E = R^2 experts, each one neuron e_i(x) = GELU(u_i . x) v_i; each of H
heads normalises its query (batch norm, as in the paper), retrieves the K experts with the
largest query . key through two R-row sub-key tables (no [tokens, E] score matrix) and sums
them with softmax weights over their K scores. The tiny preset has E = 65,536 (R = 256), H = 8,
K = 16 (the paper's H and K): 128 active neurons per token, a quarter of switch_base:tiny's 512
active hidden units (the retrieval itself, H*R*Q per token, costs more than the neurons). The
full preset is the paper's size: E = 1024^2 = 1,048,576 per layer.

Choices: model.moe.d_expert = 1, so the layer's expert bank IS the pool (w_in holds the u_i,
w_out the v_i; no other expert weights are built). Query batch norm takes its statistics per
routing group; with group_layout 'position' and a group = one position of all the batch's
sequences, training stays causal. Evaluation and decoding use the running statistics.

Full recipe (needs accelerators; on a small machine it stops at the memory pre-flight):
  python -m moejax.train --config configs/peer.py --workdir /tmp/peer
CPU-sized member, same trunk and steps as switch_base:tiny (trains on 2 cores):
  python -m moejax.train --config configs/peer.py:tiny --workdir /tmp/peer_tiny
"""

from moejax import recipes


def get_config(preset: str = ""):
  c = recipes.switch_base_family(preset, "configs/peer.py")
  moe, t = c.model.moe, c.train
  moe.router, moe.d_expert = "peer", 1
  moe.num_experts = 256**2 if preset == "tiny" else 1024**2
  moe.top_k = 16  # experts per head
  peer = moe.peer
  peer.num_heads, peer.query_dim, peer.query_norm = 8, 64, "batch"
  moe.group_layout, moe.group_size = "position", t.batch_size  # one position of every sequence
  return c
