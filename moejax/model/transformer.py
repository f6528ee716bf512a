"""Decoder-only transformer LM with MoE blocks every `moe_every` layers.

Pre-norm residual blocks: x += attn(norm(x)); x += ffn(norm(x)), where ffn is a dense MLP or an
MoE layer. Logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model import routers
from moejax.model.attention import Attention
from moejax.model.experts import ExpertBank
from moejax.model.layers import DenseMLP, RMSNorm, param
from moejax.model.moe_layer import MoELayer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_moe_layer(index: int, moe_every: int) -> bool:
  """Layer `index` (0-based) is MoE when (index + 1) % moe_every == 0 (moe_every 2: 1, 3, ...)."""
  return moe_every > 0 and (index + 1) % moe_every == 0


class Block(nnx.Module):
  def __init__(self, attention: Attention, ffn: nnx.Module, d_model: int, eps: float, rules=None):
    self.attn_norm = RMSNorm(d_model, eps=eps)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model, eps=eps)
    self.ffn = ffn
    self.rules = rules

  def __call__(self, x_bld, *, train: bool, rng, token_ids_bl=None):
    x = x_bld + self.attention(self.attn_norm(x_bld))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoELayer):
      y, aux_losses, metrics = self.ffn(h, train=train, rng=rng, token_ids_bl=token_ids_bl)
    else:
      y, aux_losses, metrics = self.ffn(h), {}, {}
    x = sharding.constrain(x + y, ("batch", "length", "act_embed"), self.rules)
    return x, aux_losses, metrics


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
    self.dtype = DTYPES[m.dtype]
    self.rules = rules
    self.embed = param(rngs, (m.vocab_size, d), ("vocab", "embed"), 1.0)
    # Every weight of a block: the same init scales, keys and sharding rules.
    init = dict(init_std=std, out_std=out_std, rngs=rngs, rules=rules)
    mlp = lambda width: DenseMLP(d, width, activation=m.activation, **init)
    blocks = []
    for i in range(m.num_layers):
      attn = Attention(d, m.num_heads, head_dim, rope_theta=m.rope_theta, **init)
      if is_moe_layer(i, m.moe_every):
        router = routers.registry.build(moe, d_model=d, rngs=rngs)
        experts = ExpertBank(moe.num_experts, d, d_expert, activation=m.activation, **init)
        # K_s shared experts of width d_expert, summed, are one dense MLP of width K_s * d_expert
        # (activations act per hidden unit), added unweighted (DeepSeekMoE).
        shared = mlp(moe.num_shared_experts * d_expert) if moe.num_shared_experts else None
        ffn = MoELayer(
          router=router,
          experts=experts,
          settings=routers.registry.settings(moe),
          shared_experts=shared,
          rules=rules,
        )
      else:
        ffn = mlp(m.d_ff)
      blocks.append(Block(attn, ffn, d, m.norm_eps, rules))
    self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(d, eps=m.norm_eps)
    self.unembed = param(rngs, (d, m.vocab_size), ("embed", "vocab"), std)

  def __call__(self, tokens_bl, *, train: bool, rng: jax.Array | None = None):
    """Forward pass.

    Args:
      tokens_bl: int32 [batch, length].
      train: training mode (router jitter / noise, training capacity factor).
      rng: PRNG key for stochastic routing; each MoE layer folds in its layer index.

    Returns:
      logits float32 [batch, length, vocab]; aux = {"losses": {name: sum over MoE layers},
      "metrics": {"layer_{i}/{name}": array}}.
    """
    # FSDP: the table's embed dimension is gathered first, so the lookup (and, in the backward,
    # the scatter into its gradient) stays with this device's tokens.
    table = sharding.constrain(self.embed[...], ("vocab", None), self.rules)
    x = jnp.take(table, tokens_bl, axis=0).astype(self.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"), self.rules)
    losses, metrics = {}, {}
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, block_losses, block_metrics = block(x, train=train, rng=layer_rng, token_ids_bl=tokens_bl)
      for name, value in block_losses.items():
        losses[name] = losses.get(name, 0.0) + value
        metrics[f"layer_{i}/{name}"] = value
      for name, value in block_metrics.items():
        metrics[f"layer_{i}/{name}"] = value
    x = self.final_norm(x)
    logits = jnp.einsum(
      "bld,dv->blv", x, self.unembed[...].astype(x.dtype), preferred_element_type=jnp.float32
    )
    logits = sharding.constrain(logits, ("batch", "length", "act_vocab"), self.rules)
    return logits, {"losses": losses, "metrics": metrics}
