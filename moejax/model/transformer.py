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
  def __init__(self, attention: Attention, ffn: nnx.Module, d_model: int, eps: float):
    self.attn_norm = RMSNorm(d_model, eps=eps)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model, eps=eps)
    self.ffn = ffn

  def __call__(self, x_bld, *, train: bool, rng):
    x = x_bld + self.attention(self.attn_norm(x_bld))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoELayer):
      y, aux_losses, metrics = self.ffn(h, train=train, rng=rng)
    else:
      y, aux_losses, metrics = self.ffn(h), {}, {}
    x = sharding.constrain(x + y, ("batch", "length", "act_embed"))
    return x, aux_losses, metrics


class Transformer(nnx.Module):
  """Args: model_cfg, the `model` section of the config (sizes and the `moe` sub-section)."""

  def __init__(self, model_cfg, *, rngs: nnx.Rngs):
    m, moe = model_cfg, model_cfg.moe
    d, std = m.d_model, m.init_std
    out_std = std / math.sqrt(2 * m.num_layers)  # GPT-2 style: residual writes scaled by depth
    head_dim = m.head_dim or d // m.num_heads
    self.dtype = DTYPES[m.dtype]
    self.embed = param(rngs, (m.vocab_size, d), ("vocab", "embed"), 1.0)
    blocks = []
    for i in range(m.num_layers):
      attn = Attention(d, m.num_heads, head_dim, rope_theta=m.rope_theta, init_std=std,
                       out_std=out_std, rngs=rngs)  # fmt: skip
      if is_moe_layer(i, m.moe_every):
        router_cls = routers.get_router_class(moe.router)
        router = router_cls(
            d_model=d, num_experts=moe.num_experts, top_k=moe.top_k, rngs=rngs,
            **routers.router_options(moe.router, moe),
        )  # fmt: skip
        experts = ExpertBank(moe.num_experts, d, moe.d_expert or m.d_ff, activation=m.activation,
                             init_std=std, out_std=out_std, rngs=rngs)  # fmt: skip
        # K_s shared experts of width d_expert, summed, are one dense MLP of width K_s * d_expert
        # (activations act per hidden unit), added unweighted (DeepSeekMoE).
        shared = None
        if moe.num_shared_experts > 0:
          shared = DenseMLP(d, moe.num_shared_experts * (moe.d_expert or m.d_ff),
                            activation=m.activation, init_std=std, out_std=out_std,
                            rngs=rngs)  # fmt: skip
        ffn = MoELayer(
            router=router, experts=experts, num_experts=moe.num_experts, top_k=moe.top_k,
            dispatch=moe.dispatch, capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor, group_size=moe.group_size,
            group_layout=moe.group_layout, shared_experts=shared,
        )  # fmt: skip
      else:
        ffn = DenseMLP(d, m.d_ff, activation=m.activation, init_std=std, out_std=out_std,
                       rngs=rngs)  # fmt: skip
      blocks.append(Block(attn, ffn, d, m.norm_eps))
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
    x = jnp.take(self.embed[...], tokens_bl, axis=0).astype(self.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    losses, metrics = {}, {}
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, block_losses, block_metrics = block(x, train=train, rng=layer_rng)
      for name, value in block_losses.items():
        losses[name] = losses.get(name, 0.0) + value
        metrics[f"layer_{i}/{name}"] = value
      for name, value in block_metrics.items():
        metrics[f"layer_{i}/{name}"] = value
    x = self.final_norm(x)
    logits = jnp.einsum(
      "bld,dv->blv", x, self.unembed[...].astype(x.dtype), preferred_element_type=jnp.float32
    )
    logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
    return logits, {"losses": losses, "metrics": metrics}
