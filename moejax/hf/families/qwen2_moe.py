"""Qwen2-MoE (`model_type` "qwen2_moe"): Qwen3-MoE's layers without QK-norm, with biases on the
q/k/v projections (`qkv_bias`), and a shared expert every token uses, scaled per token by
sigmoid(x w) (moejax's shared experts with `shared_expert_gate`). The shared expert's width must
be a whole number of routed experts' widths (moejax's `num_shared_experts * d_expert`)."""

from __future__ import annotations

from moejax.hf.families import base, qwen3_moe

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"


def configure(cfg, f: base.Fields) -> None:
  qwen3_moe.configure_qwen_moe(cfg, f)
  m, moe = cfg.model, cfg.model.moe
  m.qkv_bias = bool(f.get("qkv_bias", True))
  shared = int(f.get("shared_expert_intermediate_size", 0))
  if shared % moe.d_expert:
    raise base.UnsupportedError(
      f"qwen2_moe: shared_expert_intermediate_size={shared} is not a multiple of "
      f"moe_intermediate_size={moe.d_expert}"
    )
  moe.num_shared_experts = shared // moe.d_expert
  moe.shared_expert_gate = shared > 0


def hf_config(cfg) -> dict:
  m, moe = cfg.model, cfg.model.moe
  if m.qk_norm or (moe.num_shared_experts and not moe.shared_expert_gate):
    raise base.UnsupportedError(
      "qwen2_moe export needs model.qk_norm=False and gated shared experts (or none)"
    )
  return {
    **qwen3_moe.qwen_moe_hf_config(cfg, MODEL_TYPE, ARCHITECTURE),
    "qkv_bias": m.qkv_bias,
    "shared_expert_intermediate_size": moe.num_shared_experts * (moe.d_expert or m.d_ff),
    "use_sliding_window": False,
  }


def tensors(cfg, hf: dict) -> list[base.Tensor]:
  del hf  # every tensor follows from the moejax config
  m, moe = cfg.model, cfg.model.moe
  k, d = m.head_dim, m.d_model
  heads = {"q": m.num_heads, "k": m.num_kv_heads or m.num_heads, "v": m.num_kv_heads or m.num_heads}
  out = base.outer_tensors(cfg)
  for i in range(m.num_layers):
    p = f"model.layers.{i}"
    out += qwen3_moe.layer_tensors(cfg, i)
    if m.qkv_bias:
      for x, h in heads.items():  # HF [heads * K] -> moejax [heads, K]
        name = f"{p}.self_attn.{x}_proj.bias"
        out.append(base.Tensor(f"blocks.{i}.attention.b{x}", (name,), (h * k,)))
    if (i + 1) % m.moe_every == 0 and moe.num_shared_experts:
      shared, width = f"blocks.{i}.ffn.shared_experts", moe.num_shared_experts * moe.d_expert
      out += base.swiglu_mlp(f"{shared}.module", f"{p}.mlp.shared_expert", d, width)
      out.append(base.Tensor(f"{shared}.gate", (f"{p}.mlp.shared_expert_gate.weight",), (1, d)))
  return out
