r"""Mixtral 8x7B (Jiang et al. 2024) at its published shapes, and a `tiny` member for CPU.

Shapes (the model's published config.json): 32 layers, d_model 4096, 32 query heads and 8
key/value heads of head_dim 128 (grouped-query attention), SwiGLU experts of d_ff 14336, 8
experts per layer with top-2 routing, an MoE layer in every block, vocabulary 32000, RoPE theta
1e6, RMSNorm eps 1e-5, untied embeddings. Routing: softmax over the 8 experts, top 2,
renormalised over the chosen 2 (the `switch` family with normalize_weights=True), load-balancing
loss weight 0.02 (the published router_aux_loss_coef), no router z-loss. Dispatch 'dropless':
every token reaches both of its experts, which also keeps the 'sequence' group layout causal.

Training shape for a pod: sequences of 4096 tokens, bfloat16 compute, float32 parameters and
AdamW moments, scanned layers with full remat (docs/PERFORMANCE.md: the dry-run table). Check it
fits before renting the pod:
  python -m moejax.train --config configs/mixtral_8x7b.py --dry_run --devices 16 --device tpu-v5p
CPU member (4 layers, d_model 256, 8/2 heads, 8 experts top-2; minutes on 2 cores):
  python -m moejax.train --config configs/mixtral_8x7b.py:tiny --workdir /tmp/mixtral_tiny
"""

from moejax import config_lib, recipes


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe = c.model, c.model.moe
  m.vocab_size, m.num_layers, m.d_model = 32_000, 32, 4096
  m.num_heads, m.num_kv_heads, m.head_dim = 32, 8, 128
  m.d_ff, m.activation, m.moe_every = 14_336, "swiglu", 1
  m.rope_theta, m.norm_eps = 1e6, 1e-5
  moe.router, moe.num_experts, moe.top_k = "switch", 8, 2
  moe.switch.normalize_weights = True
  moe.switch.load_balance_loss_weight, moe.switch.router_z_loss_weight = 0.02, 0.0
  moe.dispatch, moe.group_layout, moe.group_size = "dropless", "sequence", 4096
  recipes.pod_training(c, preset, "configs/mixtral_8x7b.py")
  if preset == "tiny":
    m.vocab_size, m.num_layers, m.d_model = 2048, 4, 256
    m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 8, 2, 32, 512
    moe.group_size = 128
  return c
