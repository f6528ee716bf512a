"""DeepSeek-V3 (`model_type` "deepseek_v3"): multi-head latent attention (moejax's
model.attention='mla'), the first `first_k_dense_replace` layers dense, the others MoE with
shared experts and the sigmoid gate: the score-correction bias chooses the experts (moejax's
deepseek BalanceBias), group-limited top-k over `n_group` groups scored by their top-2,
weights renormalised with `norm_topk_prob` and scaled by `routed_scaling_factor`.

DeepSeek pairs interleaved rotary dimensions (x0, x1), (x2, x3), ... (`rope_interleave`);
moejax pairs the two halves. Rotating interleaved pairs equals rotating the half-split layout of
the same numbers (even dimensions first, then odd), and q and k get the same permutation, so
scores are unchanged: the importer permutes the rotary rows of q_b_proj / q_proj and
kv_a_proj_with_mqa, the exporter permutes them back. The multi-token-prediction layers
(`num_nextn_predict_layers`, stored as layer `num_hidden_layers`) are not used by `transformers`
and are neither imported nor exported.
"""

from __future__ import annotations

import numpy as np

from moejax.hf.families import base

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"


def configure(cfg, f: base.Fields) -> None:
  base.configure_common(cfg, f)
  m, moe = cfg.model, cfg.model.moe
  f.expect("pretraining_tp", (1,), "tensor-parallel pretraining slices")
  f.expect("quantization_config", (None,), "quantized (FP8) weights: dequantize them first")
  f.expect("moe_layer_freq", (1,), "MoE layers other than every layer after the dense ones")
  f.expect("scoring_func", ("sigmoid",), "only the sigmoid gate")
  f.expect("topk_method", ("noaux_tc",), "only the bias-corrected group-limited top-k")
  for ignored in ("num_nextn_predict_layers", "ep_size", "seq_aux", "rope_interleave"):
    f.get(ignored)
  if m.num_kv_heads != m.num_heads:
    raise base.UnsupportedError("deepseek_v3: num_key_value_heads must equal num_attention_heads")
  m.num_kv_heads = None
  m.attention = "mla"
  mla = m.mla
  mla.q_lora_rank = int(f.get("q_lora_rank") or 0)
  mla.kv_lora_rank = int(f.need("kv_lora_rank"))
  mla.qk_nope_head_dim = int(f.need("qk_nope_head_dim"))
  mla.qk_rope_head_dim = int(f.need("qk_rope_head_dim"))
  mla.v_head_dim = int(f.need("v_head_dim"))
  qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
  f.expect("qk_head_dim", (qk,), "must be qk_nope_head_dim + qk_rope_head_dim")
  f.expect("head_dim", (mla.qk_rope_head_dim,), "DeepSeek's head_dim is the rotary width")
  m.head_dim = mla.qk_rope_head_dim
  m.d_ff = int(f.need("intermediate_size"))
  m.moe_every = 1
  m.first_dense_layers = int(f.get("first_k_dense_replace", 0))
  moe.d_expert = int(f.need("moe_intermediate_size"))
  moe.num_experts = int(f.need("n_routed_experts"))
  moe.top_k = int(f.need("num_experts_per_tok"))
  moe.num_shared_experts = int(f.get("n_shared_experts") or 0)
  moe.router = "deepseek"
  ds = moe.deepseek
  ds.route_scale = float(f.get("routed_scaling_factor", 1.0))
  ds.normalize_weights = bool(f.get("norm_topk_prob", True))
  ds.num_expert_groups = int(f.get("n_group") or 1)
  ds.top_expert_groups = int(f.get("topk_group") or 1)
  ds.sequence_balance_loss_weight = float(f.get("aux_loss_alpha", 1e-4))


def hf_config(cfg) -> dict:
  m, moe = cfg.model, cfg.model.moe
  if m.attention != "mla" or moe.router != "deepseek" or m.moe_every != 1:
    raise base.UnsupportedError(
      "deepseek_v3 export needs model.attention='mla', router 'deepseek' and moe_every=1"
    )
  mla, ds = m.mla, moe.deepseek
  return {
    **base.common_hf_config(cfg, MODEL_TYPE, ARCHITECTURE),
    "num_key_value_heads": m.num_heads,
    "head_dim": mla.qk_rope_head_dim,
    "q_lora_rank": mla.q_lora_rank or None,
    "kv_lora_rank": mla.kv_lora_rank,
    "qk_nope_head_dim": mla.qk_nope_head_dim,
    "qk_rope_head_dim": mla.qk_rope_head_dim,
    "qk_head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim,
    "v_head_dim": mla.v_head_dim,
    "intermediate_size": m.d_ff,
    "first_k_dense_replace": m.first_dense_layers,
    "moe_intermediate_size": moe.d_expert or m.d_ff,
    "n_routed_experts": moe.num_experts,
    "n_shared_experts": moe.num_shared_experts,
    "num_experts_per_tok": moe.top_k,
    "routed_scaling_factor": ds.route_scale,
    "norm_topk_prob": ds.normalize_weights,
    "n_group": ds.num_expert_groups,
    "topk_group": ds.top_expert_groups,
  }


def unused_tensors(hf: dict) -> tuple[str, ...]:
  """Name prefixes of the multi-token-prediction layers (after the last decoder layer)."""
  first, extra = int(hf["num_hidden_layers"]), int(hf.get("num_nextn_predict_layers") or 0)
  return tuple(f"model.layers.{first + j}." for j in range(extra))


def _rotary_rows(before: int, rope: int, interleaved: bool) -> list[int]:
  """Rows of [before plain rows, rope rotary rows] in moejax's half-split rotary order."""
  rotary = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)]) if interleaved else None
  rows = np.arange(before + rope)
  if rotary is not None:
    rows[before:] = before + rotary
  return rows.tolist()


def tensors(cfg, hf: dict) -> list[base.Tensor]:
  m, moe, mla = cfg.model, cfg.model.moe, cfg.model.mla
  d, h = m.d_model, m.num_heads
  qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
  interleaved = bool(hf.get("rope_interleave", True))
  head_rows = _rotary_rows(mla.qk_nope_head_dim, mla.qk_rope_head_dim, interleaved)
  q_rows = tuple(j * qk + r for j in range(h) for r in head_rows)
  kv_rows = tuple(_rotary_rows(mla.kv_lora_rank, mla.qk_rope_head_dim, interleaved))
  out = base.outer_tensors(cfg)
  for i in range(m.num_layers):
    p, a = f"model.layers.{i}", f"blocks.{i}.attention"
    out += base.layer_norm_tensors(cfg, i)
    if mla.q_lora_rank:
      r = mla.q_lora_rank
      out.append(base.linear(f"{a}.wq_a", f"{p}.self_attn.q_a_proj.weight", r, d))
      out.append(base.vector(f"{a}.q_norm.scale", f"{p}.self_attn.q_a_layernorm.weight", r))
      q = base.Tensor(f"{a}.wq_b", (f"{p}.self_attn.q_b_proj.weight",), (h * qk, r), True, q_rows)
    else:
      q = base.Tensor(f"{a}.wq", (f"{p}.self_attn.q_proj.weight",), (h * qk, d), True, q_rows)
    kv_a = f"{p}.self_attn.kv_a_proj_with_mqa.weight"
    out += [
      q,
      base.Tensor(f"{a}.wkv_a", (kv_a,), (len(kv_rows), d), True, kv_rows),
      base.vector(f"{a}.kv_norm.scale", f"{p}.self_attn.kv_a_layernorm.weight", mla.kv_lora_rank),
      base.linear(
        f"{a}.wkv_b",
        f"{p}.self_attn.kv_b_proj.weight",
        h * (mla.qk_nope_head_dim + mla.v_head_dim),
        mla.kv_lora_rank,
      ),
      base.linear(f"{a}.wo", f"{p}.self_attn.o_proj.weight", d, h * mla.v_head_dim),
    ]
    if i < m.first_dense_layers:
      out += base.swiglu_mlp(f"blocks.{i}.ffn", f"{p}.mlp", d, m.d_ff)
      continue
    r = f"blocks.{i}.ffn.router"
    out.append(base.linear(f"{r}.kernel", f"{p}.mlp.gate.weight", moe.num_experts, d))
    out.append(base.vector(f"{r}.bias", f"{p}.mlp.gate.e_score_correction_bias", moe.num_experts))
    names = ("gate_proj", "up_proj", "down_proj")
    out += base.swiglu_experts(cfg, i, f"{p}.mlp.experts", names, moe.num_experts, moe.d_expert)
    if moe.num_shared_experts:
      width = moe.num_shared_experts * moe.d_expert
      out += base.swiglu_mlp(f"blocks.{i}.ffn.shared_experts", f"{p}.mlp.shared_experts", d, width)
  return out
