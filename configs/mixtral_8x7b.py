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

from moejax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size, m.num_layers, m.d_model = 32_000, 32, 4096
  m.num_heads, m.num_kv_heads, m.head_dim = 32, 8, 128
  m.d_ff, m.activation, m.moe_every = 14_336, "swiglu", 1
  m.rope_theta, m.norm_eps = 1e6, 1e-5
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.scan_layers, m.remat = True, "full"
  moe.router, moe.num_experts, moe.top_k = "switch", 8, 2
  moe.switch.normalize_weights = True
  moe.switch.load_balance_loss_weight, moe.switch.router_z_loss_weight = 0.02, 0.0
  moe.dispatch, moe.group_layout, moe.group_size = "dropless", "sequence", 4096
  t.steps, t.batch_size, t.seq_len = 100_000, 64, 4096
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 1000, 50
  c.optim.learning_rate, c.optim.warmup_steps = 3e-4, 2000
  c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device (docs/PERFORMANCE.md)
  if preset == "tiny":
    m.vocab_size, m.num_layers, m.d_model = 2048, 4, 256
    m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = 8, 2, 32, 512
    m.dtype = "float32"
    m.remat = "none"
    moe.group_size = 128
    t.steps, t.batch_size, t.seq_len = 300, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 100, 100, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
    c.mesh.data, c.mesh.fsdp = -1, 1
  elif preset:
    raise config_lib.ConfigError(
      f"configs/mixtral_8x7b.py: unknown preset {preset!r}; known: '' (full), 'tiny'"
    )
  return c
