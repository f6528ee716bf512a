r"""Qwen3-30B-A3B (Qwen3 technical report, 2025) at its published shapes, and a `tiny` member.

Shapes (the model's published config.json): 48 layers, d_model 2048, 32 query heads and 4
key/value heads of head_dim 128 (so queries are 4096 wide, twice d_model), QK-norm (RMSNorm of q
and k over head_dim before RoPE), 128 SwiGLU experts of d_ff 768 with top-8 routing in every
block, vocabulary 151936, RoPE theta 1e6, RMSNorm eps 1e-6, untied embeddings. Routing: softmax
over 128 experts, top 8, renormalised (norm_topk_prob: the `switch` family with
normalize_weights=True), load-balancing loss weight 0.001 (router_aux_loss_coef), dropless.

Training shape for a pod: sequences of 4096 tokens, bfloat16 compute, float32 parameters and
moments, scanned layers with full remat, loss chunked over tokens (a 151936-wide vocabulary makes
full float32 logits 0.6 MB per token). Dry run:
  python -m moejax.train --config configs/qwen3_moe_30b_a3b.py --dry_run --devices 8 \
      --device tpu-v5p
CPU member (4 layers, d_model 128, 8/2 heads of 32, 16 experts top-4; minutes on 2 cores):
  python -m moejax.train --config configs/qwen3_moe_30b_a3b.py:tiny --workdir /tmp/qwen3_tiny
"""

from moejax import config_lib, recipes


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe = c.model, c.model.moe
  m.vocab_size, m.num_layers, m.d_model = 151_936, 48, 2048
  m.num_heads, m.num_kv_heads, m.head_dim, m.qk_norm = 32, 4, 128, True
  m.d_ff, m.activation, m.moe_every = 768, "swiglu", 1
  m.rope_theta, m.norm_eps = 1e6, 1e-6
  moe.router, moe.num_experts, moe.top_k = "switch", 128, 8
  moe.switch.normalize_weights = True
  moe.switch.load_balance_loss_weight, moe.switch.router_z_loss_weight = 1e-3, 0.0
  moe.dispatch, moe.group_layout, moe.group_size = "dropless", "sequence", 4096
  recipes.pod_training(c, preset, "configs/qwen3_moe_30b_a3b.py")
  if preset == "tiny":
    m.vocab_size, m.num_layers, m.d_model = 2048, 4, 128
    m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 8, 2, 32, 128
    moe.num_experts, moe.top_k, moe.group_size = 16, 4, 128
  return c
