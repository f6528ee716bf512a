"""What a model family declares for the converter, and the pieces the families share.

A family maps one Hugging Face `model_type` onto moejax:
- `configure(cfg, hf)`: sets the moejax config from the HF config dict; every HF field must be
  understood (mapped, checked to have the one value moejax computes, or in `IGNORED`), otherwise
  `UnsupportedError` names it;
- `hf_config(cfg)`: the HF config fields of a moejax config (export);
- `tensors(cfg, hf)`: one `Tensor` per moejax parameter (per-layer names) saying which HF tensors
  hold it and how (Linear weights are [out, in], moejax kernels [in, ...out]); `hf` is the HF
  config, for layout choices moejax does not keep (DeepSeek's interleaved RoPE).

Naming (einsum legend of the model): D d_model, H query heads, G key/value heads, K head dim,
E experts, F expert hidden, V vocab.
"""

from __future__ import annotations

import dataclasses

from moejax import errors

# Fields that do not change the function a checkpoint computes, or that only generation or the
# HF runtime reads: accepted and kept (export writes back the imported config.json's values).
IGNORED = frozenset(
  {
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "max_position_embeddings",
    "output_router_logits",
    "attention_dropout",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "id2label",
    "label2id",
  }
)
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}  # HF dtype -> model.param_dtype


class UnsupportedError(errors.ConfigError):
  """The HF model uses something moejax does not compute; the message names it."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moejax parameter and the HF tensors it is made of.

  Attributes:
    path: moejax per-layer name, e.g. "blocks.0.attention.wq".
    hf: one HF name, or one per expert (stacked on moejax's leading axis).
    hf_shape: the shape of each HF tensor.
    transpose: the HF tensor is a Linear weight [out, in]: moejax holds its transpose,
      reshaped (e.g. q_proj [H*K, D] -> wq [D, H, K]).
    rows: moejax reads HF row rows[j] as its row j (a permutation of the HF tensor's first
      axis, e.g. interleaved -> half-split rotary dimensions); None = as stored.
  """

  path: str
  hf: tuple[str, ...]
  hf_shape: tuple[int, ...]
  transpose: bool = False
  rows: tuple[int, ...] | None = None


def linear(path: str, hf: str, out_features: int, in_features: int) -> Tensor:
  return Tensor(path, (hf,), (out_features, in_features), transpose=True)


def vector(path: str, hf: str, size: int) -> Tensor:
  return Tensor(path, (hf,), (size,))


def experts(path: str, names: list[str], out_features: int, in_features: int) -> Tensor:
  return Tensor(path, tuple(names), (out_features, in_features), transpose=True)


class Fields:
  """Reads an HF config dict, remembering which fields were understood."""

  def __init__(self, hf: dict, model_type: str):
    self.hf = hf
    self.model_type = model_type
    self.used = set(IGNORED)

  def get(self, key: str, default=None):
    self.used.add(key)
    return self.hf.get(key, default)

  def need(self, key: str, default=None):
    """A field that must be present (or have a default)."""
    value = self.get(key, default)
    if value is None:
      raise UnsupportedError(f"{self.model_type}: config.json lacks {key!r}")
    return value

  def expect(self, key: str, allowed, why: str) -> None:
    """Refuses a field whose value is not one of `allowed` (absent counts as allowed)."""
    self.used.add(key)
    if key in self.hf and self.hf[key] not in allowed:
      raise UnsupportedError(
        f"{self.model_type}: config field {key}={self.hf[key]!r} is not supported ({why})"
      )

  def refuse_unknown(self) -> None:
    unknown = sorted(set(self.hf) - self.used)
    if unknown:
      shown = ", ".join(f"{k}={self.hf[k]!r}" for k in unknown[:4])
      raise UnsupportedError(
        f"{self.model_type}: config field(s) moejax does not know: {shown}"
        + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else "")
      )


def configure_common(cfg, f: Fields) -> None:
  """The fields every supported family shares: sizes, RMSNorm, RoPE, SwiGLU, untied embeddings."""
  m = cfg.model
  m.vocab_size = int(f.need("vocab_size"))
  m.d_model = int(f.need("hidden_size"))
  m.num_layers = int(f.need("num_hidden_layers"))
  m.num_heads = int(f.need("num_attention_heads"))
  m.num_kv_heads = int(f.get("num_key_value_heads") or m.num_heads)
  m.head_dim = int(f.get("head_dim") or m.d_model // m.num_heads)
  m.norm_eps = float(f.need("rms_norm_eps"))
  m.init_std = float(f.get("initializer_range", 0.02))
  m.activation = "swiglu"
  f.expect("hidden_act", ("silu",), "moejax's swiglu uses silu")
  f.expect("tie_word_embeddings", (False,), "tied input/output embeddings")
  f.expect("attention_bias", (False,), "biases on the attention projections")
  if f.get("use_sliding_window") is False:  # the window fields are then unused
    f.get("sliding_window"), f.get("max_window_layers")
  else:
    f.expect("sliding_window", (None,), "sliding-window attention")
  f.expect("use_sliding_window", (False,), "sliding-window attention")
  layer_types = f.get("layer_types") or []
  if set(layer_types) - {"full_attention"}:
    raise UnsupportedError(f"{f.model_type}: layer_types={layer_types}: only full attention")
  f.expect("rope_scaling", (None,), "RoPE scaling")
  rope = f.get("rope_parameters")
  if rope is not None:
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
      raise UnsupportedError(f"{f.model_type}: rope_parameters={rope!r}: only default RoPE")
    m.rope_theta = float(rope["rope_theta"])
  else:
    m.rope_theta = float(f.need("rope_theta"))
  dtype = f.get("dtype") or f.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise UnsupportedError(f"{f.model_type}: dtype={dtype!r}: only {', '.join(DTYPES)} weights")
  m.param_dtype = DTYPES[dtype]
  m.scan_layers = False  # the checkpoint is written per layer; any layout restores it
  moe = m.moe
  moe.dispatch = "dropless"  # every (token, expert) pair is computed, as in the reference
  moe.eval_dispatch = "dropless"


def configure_softmax_router(cfg, f: Fields, experts_key: str, normalize: bool, aux: float):
  """Softmax over all experts, then top-k (moejax's `switch` router), k weights renormalised
  when `normalize`; the HF families train with a load-balancing loss and no z-loss."""
  moe = cfg.model.moe
  moe.num_experts = int(f.need(experts_key))
  moe.top_k = int(f.need("num_experts_per_tok"))
  moe.router = "switch"
  moe.switch.normalize_weights = normalize
  moe.switch.load_balance_loss_weight = float(f.get("router_aux_loss_coef", aux))
  moe.switch.router_z_loss_weight = 0.0


def common_hf_config(cfg, model_type: str, architecture: str) -> dict:
  m = cfg.model
  return {
    "architectures": [architecture],
    "model_type": model_type,
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads or m.num_heads,
    "head_dim": m.head_dim or m.d_model // m.num_heads,
    "rms_norm_eps": m.norm_eps,
    "initializer_range": m.init_std,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
    "dtype": m.param_dtype,
  }


def attention_tensors(cfg, i: int, prefix: str) -> list[Tensor]:
  """q/k/v/o projections of layer i (`prefix` = "model.layers.{i}.self_attn")."""
  m = cfg.model
  d, k = m.d_model, m.head_dim or m.d_model // m.num_heads
  h, g = m.num_heads, m.num_kv_heads or m.num_heads
  a = f"blocks.{i}.attention"
  return [
    linear(f"{a}.wq", f"{prefix}.q_proj.weight", h * k, d),
    linear(f"{a}.wk", f"{prefix}.k_proj.weight", g * k, d),
    linear(f"{a}.wv", f"{prefix}.v_proj.weight", g * k, d),
    linear(f"{a}.wo", f"{prefix}.o_proj.weight", d, h * k),
  ]


def outer_tensors(cfg) -> list[Tensor]:
  """Embedding, final norm and unembedding."""
  m = cfg.model
  return [
    Tensor("embed", ("model.embed_tokens.weight",), (m.vocab_size, m.d_model)),
    vector("final_norm.scale", "model.norm.weight", m.d_model),
    linear("unembed", "lm_head.weight", m.vocab_size, m.d_model),
  ]


def layer_norm_tensors(cfg, i: int) -> list[Tensor]:
  d, p = cfg.model.d_model, f"model.layers.{i}"
  return [
    vector(f"blocks.{i}.attn_norm.scale", f"{p}.input_layernorm.weight", d),
    vector(f"blocks.{i}.ffn_norm.scale", f"{p}.post_attention_layernorm.weight", d),
  ]


def swiglu_experts(cfg, i: int, prefix: str, names: tuple[str, str, str], e: int, f: int):
  """Stacked expert weights of layer i from per-expert HF Linears.

  `names` = the HF (gate, up, down) projection names under `{prefix}.{expert}.`. moejax's
  `w_in` is the activated (gate) branch, `w_gate` the linear (up) one.
  """
  d, x = cfg.model.d_model, f"blocks.{i}.ffn.experts"
  gate, up, down = ([f"{prefix}.{j}.{name}.weight" for j in range(e)] for name in names)
  return [
    experts(f"{x}.w_in", gate, f, d),
    experts(f"{x}.w_gate", up, f, d),
    experts(f"{x}.w_out", down, d, f),
  ]


def swiglu_mlp(path: str, prefix: str, d: int, f: int) -> list[Tensor]:
  """A dense SwiGLU MLP (gate_proj, up_proj, down_proj) as moejax's DenseMLP at `path`."""
  return [
    linear(f"{path}.w_in", f"{prefix}.gate_proj.weight", f, d),
    linear(f"{path}.w_gate", f"{prefix}.up_proj.weight", f, d),
    linear(f"{path}.w_out", f"{prefix}.down_proj.weight", d, f),
  ]
