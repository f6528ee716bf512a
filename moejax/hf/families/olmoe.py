"""OLMoE (`model_type` "olmoe"): every layer is MoE; QK-norm is one RMSNorm over the whole q
projection (all heads, width H*K) and one over the whole k projection (G*K), before the split into
heads (moejax's qk_norm_scope "all_heads"); softmax, top-k, renormalised with `norm_topk_prob`."""

from __future__ import annotations

from moejax.hf.families import base, qwen3_moe

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"


def configure(cfg, f: base.Fields) -> None:
  base.configure_common(cfg, f)
  m, moe = cfg.model, cfg.model.moe
  f.expect("clip_qkv", (None,), "clipping of q, k and v")
  if m.head_dim != m.d_model // m.num_heads:
    raise base.UnsupportedError(f"olmoe: head_dim={m.head_dim} != hidden_size / heads")
  m.qk_norm, m.qk_norm_scope = True, "all_heads"
  m.d_ff = int(f.need("intermediate_size"))
  m.moe_every = 1
  moe.d_expert = m.d_ff
  normalize = bool(f.get("norm_topk_prob", False))
  base.configure_softmax_router(cfg, f, "num_experts", normalize=normalize, aux=0.01)


def hf_config(cfg) -> dict:
  m, moe = cfg.model, cfg.model.moe
  if not (m.qk_norm and m.qk_norm_scope == "all_heads") or m.moe_every != 1:
    raise base.UnsupportedError("olmoe export needs qk_norm_scope='all_heads' and moe_every=1")
  out = qwen3_moe.qwen_moe_hf_config(cfg, MODEL_TYPE, ARCHITECTURE)
  for key in ("moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "head_dim"):
    del out[key]
  return {**out, "intermediate_size": moe.d_expert or m.d_ff, "clip_qkv": None}


def tensors(cfg, hf: dict) -> list[base.Tensor]:
  del hf  # every tensor follows from the moejax config
  m = cfg.model
  k = m.head_dim or m.d_model // m.num_heads
  width = {"q": m.num_heads * k, "k": (m.num_kv_heads or m.num_heads) * k}
  out = base.outer_tensors(cfg)
  for i in range(m.num_layers):
    out += qwen3_moe.layer_tensors(cfg, i)
    for x in "qk":  # HF [heads * K] -> moejax scale [heads, K]
      name = f"model.layers.{i}.self_attn.{x}_norm.weight"
      out.append(base.Tensor(f"blocks.{i}.attention.{x}_norm.scale", (name,), (width[x],)))
  return out
