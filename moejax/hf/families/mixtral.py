"""Mixtral (`model_type` "mixtral"): every layer is MoE; softmax over all experts, then top-k,
the k weights renormalised to sum to 1 (moejax's `switch` router with `normalize_weights`)."""

from __future__ import annotations

from moejax.hf.families import base

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"


def configure(cfg, f: base.Fields) -> None:
  base.configure_common(cfg, f)
  m, moe = cfg.model, cfg.model.moe
  m.d_ff = int(f.need("intermediate_size"))
  m.moe_every = 1
  moe.d_expert = m.d_ff
  base.configure_softmax_router(cfg, f, "num_local_experts", normalize=True, aux=0.001)
  moe.switch.jitter_eps = float(f.get("router_jitter_noise", 0.0))


def hf_config(cfg) -> dict:
  m, moe = cfg.model, cfg.model.moe
  if moe.router != "switch" or not moe.switch.normalize_weights or m.moe_every != 1:
    raise base.UnsupportedError(
      "mixtral export needs model.moe.router='switch' with normalize_weights and moe_every=1"
    )
  return {
    **base.common_hf_config(cfg, MODEL_TYPE, ARCHITECTURE),
    "intermediate_size": moe.d_expert or m.d_ff,
    "num_local_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "router_jitter_noise": moe.switch.jitter_eps,
    "router_aux_loss_coef": moe.switch.load_balance_loss_weight,
    "sliding_window": None,
  }


def tensors(cfg, hf: dict) -> list[base.Tensor]:
  del hf  # every tensor follows from the moejax config
  m, moe = cfg.model, cfg.model.moe
  out = base.outer_tensors(cfg)
  for i in range(m.num_layers):
    p = f"model.layers.{i}"
    out += base.layer_norm_tensors(cfg, i)
    out += base.attention_tensors(cfg, i, f"{p}.self_attn")
    gate = f"{p}.block_sparse_moe.gate.weight"
    out.append(base.linear(f"blocks.{i}.ffn.router.kernel", gate, moe.num_experts, m.d_model))
    out += base.swiglu_experts(
      cfg,
      i,
      f"{p}.block_sparse_moe.experts",
      ("w1", "w3", "w2"),
      moe.num_experts,
      moe.d_expert or m.d_ff,
    )
  return out
