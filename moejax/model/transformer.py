"""Decoder-only transformer LM with MoE blocks every `moe_every` layers.

Pre-norm residual blocks (moejax/model/blocks.py), run as a Python loop over `blocks` or, with
`model.scan_layers`, as an `nnx.scan` over `stack` (one repeating unit of `moe_every` layers per
step; parameters with a leading layer axis). `model.remat` checkpoints every block.

The model returns float32 logits [B, L, V], or (`return_hidden=True`) the final normalised hidden
states [B, L, D], from which the training loss is computed in chunks of tokens without ever
building the [B, L, V] logits (`logits(hidden)` gives them when needed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model import blocks as blocks_lib
from moejax.model import routers
from moejax.model.attention import Attention
from moejax.model.blocks import Block, is_moe_layer  # noqa: F401 - is_moe_layer re-exported
from moejax.model.experts import ExpertBank
from moejax.model.latent_attention import LatentAttention, MLAOptions
from moejax.model.layers import DenseMLP, RMSNorm, SigmoidGated, param
from moejax.model.moe_layer import MoELayer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Transformer(nnx.Module):
  """The decoder-only LM.

  Args:
    model_cfg: the `model` section of the config (sizes and the `moe` sub-section).
    rngs: parameter initialisation keys.
    rules: sharding rules (moejax/sharding.py); None builds an unsharded model.
  """

  def __init__(self, model_cfg, *, rngs: nnx.Rngs, rules: sharding.Rules | None = None):
    m, moe = model_cfg, model_cfg.moe
    d, std = m.d_model, m.init_std
    out_std = std / math.sqrt(2 * m.num_layers)  # GPT-2 style: residual writes scaled by depth
    head_dim = m.head_dim or d // m.num_heads
    d_expert = moe.d_expert or m.d_ff
    pdtype = DTYPES[m.param_dtype]
    self.dtype = DTYPES[m.dtype]
    self.rules = rules
    self.remat = m.remat
    self.embed = param(rngs, (m.vocab_size, d), ("vocab", "embed"), 1.0, pdtype)
    # Every weight of a block: the same init scales, keys, sharding rules and storage dtype.
    init = dict(init_std=std, out_std=out_std, rngs=rngs, rules=rules, param_dtype=pdtype)
    mlp = lambda width: DenseMLP(d, width, activation=m.activation, **init)
    blocks = []
    for i in range(m.num_layers):
      attn = _attention(m, head_dim, init)
      if is_moe_layer(i, m.moe_every, m.first_dense_layers):
        router = routers.registry.build(moe, d_model=d, rngs=rngs)
        experts = ExpertBank(moe.num_experts, d, d_expert, activation=m.activation, **init)
        # K_s shared experts of width d_expert, summed, are one dense MLP of width K_s * d_expert
        # (activations act per hidden unit), added unweighted (DeepSeekMoE).
        shared = mlp(moe.num_shared_experts * d_expert) if moe.num_shared_experts else None
        if shared is not None and moe.shared_expert_gate:
          shared = SigmoidGated(shared, d)
        ffn = MoELayer(
          router=router,
          experts=experts,
          settings=routers.registry.settings(moe),
          shared_experts=shared,
          rules=rules,
        )
      else:
        ffn = mlp(m.d_ff)
      blocks.append(Block(attn, ffn, d, m.norm_eps, rules, dtype=pdtype))
    if m.scan_layers:
      self.stack = blocks_lib.stack_blocks(blocks, blocks_lib.unit_size(m.moe_every))
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(d, eps=m.norm_eps, dtype=pdtype)
    self.unembed = param(rngs, (d, m.vocab_size), ("embed", "vocab"), std, pdtype)

  @property
  def scanned(self) -> bool:
    return hasattr(self, "stack")

  def block_modules(self) -> list[Block]:
    """The Block modules: one per layer, or (scanned) one per unit position, stacked."""
    return list(self.stack if self.scanned else self.blocks)

  def __call__(
    self, tokens_bl, *, train: bool, rng: jax.Array | None = None, return_hidden: bool = False
  ):
    """Forward pass.

    Args:
      tokens_bl: int32 [batch, length].
      train: training mode (router jitter / noise, training capacity factor).
      rng: PRNG key for stochastic routing; layer i folds in its index i.
      return_hidden: return the final normalised hidden states instead of the logits.

    Returns:
      (logits float32 [batch, length, vocab], or hidden [batch, length, d_model] in the compute
      dtype); aux = {"losses": {name: sum over MoE layers}, "metrics": {"layer_{i}/{name}": array}}.
    """
    # FSDP: the table's embed dimension is gathered first, so the lookup (and, in the backward,
    # the scatter into its gradient) stays with this device's tokens.
    table = sharding.constrain(self.embed[...], ("vocab", None), self.rules)
    x = jnp.take(table, tokens_bl, axis=0).astype(self.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"), self.rules)
    run = blocks_lib.scan_layers if self.scanned else blocks_lib.run_layers
    x, losses, metrics = run(
      self.stack if self.scanned else self.blocks,
      x,
      train=train,
      rng=rng,
      token_ids_bl=tokens_bl,
      remat=self.remat,
    )
    x = self.final_norm(x)
    aux = {"losses": losses, "metrics": metrics}
    return (x, aux) if return_hidden else (self.logits(x), aux)

  def logits(self, hidden_bld):
    """Final hidden states [B, L, D] -> float32 logits [B, L, V]."""
    logits = jnp.einsum(
      "bld,dv->blv",
      hidden_bld,
      self.unembed[...].astype(hidden_bld.dtype),
      preferred_element_type=jnp.float32,
    )
    return sharding.constrain(logits, ("batch", "length", "act_vocab"), self.rules)


def _attention(m, head_dim: int, init: dict):
  """The attention of one layer: multi-head (GQA, QK-norm, biases) or latent (`model.attention`)."""
  if m.attention == "mla":
    options = MLAOptions(**m.mla.to_dict())
    return LatentAttention(
      m.d_model, m.num_heads, options, rope_theta=m.rope_theta, impl=m.attention_impl, **init
    )
  return Attention(
    m.d_model,
    m.num_heads,
    head_dim,
    rope_theta=m.rope_theta,
    num_kv_heads=m.num_kv_heads,
    qk_norm=m.qk_norm,
    qk_norm_scope=m.qk_norm_scope,
    qkv_bias=m.qkv_bias,
    norm_eps=m.norm_eps,
    impl=m.attention_impl,
    **init,
  )
