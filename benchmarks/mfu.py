"""Model FLOPs per token and model-FLOPs utilisation (MFU) for the train-step benchmark.

MFU = (model FLOPs per token x tokens/s) / the device's peak FLOP/s. Model FLOPs count only the
useful matmuls of forward + backward (PaLM, Chowdhery et al. 2022, appendix B):
  6 x (active matmul parameters) + 6 x 2 x layers x seq_len x (heads x head_dim)
where the second term is attention's scores and values (q.k and p.v, full square: XLA computes the
causal mask's zeros too). Routing, dispatch, capacity slack, norms and the optimizer are overhead,
so a slower dispatch lowers MFU. Active matmul parameters per token: attention projections,
dense MLPs, k experts (+ shared experts and the router) in MoE layers, and the unembedding (the
embedding is a gather, not a matmul).
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity). Matched as
# substrings of `jax.devices()[0].device_kind`, first match wins, so specific names come first.
PEAK_BF16_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("GH200", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v6 lite", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one `device_kind` chip, or None where unknown (e.g. CPUs)."""
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def active_matmul_params(cfg) -> int:
  """Weights one token multiplies by in a forward pass (see the module docstring)."""
  m, moe = cfg.model, cfg.model.moe
  d = m.d_model
  head_dim = m.head_dim or d // m.num_heads
  attention = 4 * d * m.num_heads * head_dim  # q, k, v, out projections
  mats = 3 if m.activation == "swiglu" else 2  # gate + in + out, or in + out
  dense_mlp = mats * d * m.d_ff
  d_expert = moe.d_expert or m.d_ff
  moe_mlp = (
    moe.top_k * mats * d * d_expert
    + moe.num_shared_experts * mats * d * d_expert
    + d * moe.num_experts  # router logits
  )
  total = d * m.vocab_size  # unembedding
  for i in range(m.num_layers):
    is_moe = m.moe_every > 0 and (i + 1) % m.moe_every == 0
    total += attention + (moe_mlp if is_moe else dense_mlp)
  return total


def model_flops_per_token(cfg) -> float:
  """Forward + backward model FLOPs per token of a sequence of `train.seq_len` tokens."""
  m = cfg.model
  attention_width = m.num_heads * (m.head_dim or m.d_model // m.num_heads)
  return 6 * active_matmul_params(cfg) + 12 * m.num_layers * cfg.train.seq_len * attention_width


def mfu(
  cfg, tokens_per_second: float, device_kind: str, peak_override: float | None = None
) -> float | None:
  """Fraction of the device's peak FLOP/s spent on model FLOPs; None where the peak is unknown."""
  peak = peak_override or peak_flops(device_kind)
  if peak is None:
    return None
  return model_flops_per_token(cfg) * tokens_per_second / peak
