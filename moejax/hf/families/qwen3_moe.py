"""Qwen3-MoE (`model_type` "qwen3_moe"): QK-norm over each head's dimension before RoPE; softmax
over all experts, top-k, the k weights renormalised only with `norm_topk_prob`; layer i is MoE
when (i + 1) % decoder_sparse_step == 0 (moejax's moe_every), the others dense SwiGLU MLPs of
width intermediate_size."""

from __future__ import annotations

from moejax.hf.families import base

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"


def configure_qwen_moe(cfg, f: base.Fields) -> None:
  """The MoE fields Qwen2-MoE and Qwen3-MoE share."""
  base.configure_common(cfg, f)
  m, moe = cfg.model, cfg.model.moe
  m.d_ff = int(f.need("intermediate_size"))
  m.moe_every = int(f.get("decoder_sparse_step", 1))
  f.expect("mlp_only_layers", ([],), "dense layers other than decoder_sparse_step's pattern")
  moe.d_expert = int(f.need("moe_intermediate_size"))
  key = "num_experts" if "num_experts" in f.hf else "num_local_experts"
  normalize = bool(f.get("norm_topk_prob", False))
  base.configure_softmax_router(cfg, f, key, normalize=normalize, aux=0.001)


def configure(cfg, f: base.Fields) -> None:
  configure_qwen_moe(cfg, f)
  cfg.model.qk_norm = True


def qwen_moe_hf_config(cfg, model_type: str, architecture: str) -> dict:
  m, moe = cfg.model, cfg.model.moe
  if moe.router != "switch" or m.moe_every < 1:
    raise base.UnsupportedError(f"{model_type} export needs model.moe.router='switch'")
  return {
    **base.common_hf_config(cfg, model_type, architecture),
    "intermediate_size": m.d_ff,
    "moe_intermediate_size": moe.d_expert or m.d_ff,
    "decoder_sparse_step": m.moe_every,
    "mlp_only_layers": [],
    "num_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "norm_topk_prob": moe.switch.normalize_weights,
    "router_aux_loss_coef": moe.switch.load_balance_loss_weight,
  }


def hf_config(cfg) -> dict:
  if not cfg.model.qk_norm:
    raise base.UnsupportedError("qwen3_moe export needs model.qk_norm=True")
  return qwen_moe_hf_config(cfg, MODEL_TYPE, ARCHITECTURE)


def layer_tensors(cfg, i: int) -> list[base.Tensor]:
  """Norms, attention and the (MoE or dense) MLP of layer i, without the attention extras."""
  m, moe = cfg.model, cfg.model.moe
  p = f"model.layers.{i}"
  out = base.layer_norm_tensors(cfg, i) + base.attention_tensors(cfg, i, f"{p}.self_attn")
  if (i + 1) % m.moe_every:
    return out + base.swiglu_mlp(f"blocks.{i}.ffn", f"{p}.mlp", m.d_model, m.d_ff)
  gate = f"{p}.mlp.gate.weight"
  out.append(base.linear(f"blocks.{i}.ffn.router.kernel", gate, moe.num_experts, m.d_model))
  names = ("gate_proj", "up_proj", "down_proj")
  return out + base.swiglu_experts(
    cfg, i, f"{p}.mlp.experts", names, moe.num_experts, moe.d_expert or m.d_ff
  )


def tensors(cfg, hf: dict) -> list[base.Tensor]:
  del hf  # every tensor follows from the moejax config
  k = cfg.model.head_dim
  out = base.outer_tensors(cfg)
  for i in range(cfg.model.num_layers):
    p = f"model.layers.{i}.self_attn"
    out += layer_tensors(cfg, i)
    out.append(base.vector(f"blocks.{i}.attention.q_norm.scale", f"{p}.q_norm.weight", k))
    out.append(base.vector(f"blocks.{i}.attention.k_norm.scale", f"{p}.k_norm.weight", k))
  return out
