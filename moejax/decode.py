"""Incremental decoding with a key/value cache, on the parameters of `model.transformer`.

Einsum letters: b batch, l new positions, d d_model, v vocab. Cached attention itself is
`Attention.decode` (moejax/model/attention.py).

`forward_with_cache(model, tokens_bl, cache, offset)` computes the logits of L new tokens at
positions offset..offset+L-1 given the keys and values of positions < offset in `cache`, and
returns the cache with the new positions written. One function serves the prompt (prefill,
L = prompt length, offset 0) and every generated token (L = 1), and reads the same parameters
as `Transformer.__call__`, so no weight is converted or duplicated.

Routing at decode time (the router's inference behaviour, `train=False`; docs/INFERENCE.md):
- group_layout 'sequence': every new token is routed on its own (a group of one token). Token-
  choice routers (switch / top_k, gshard_top2, noisy_top_k, deepseek) route per token anyway, so
  this is their evaluation routing minus capacity dropping (one token never overflows an
  expert). It equals a full forward pass whenever that pass drops nothing. BASE needs groups of
  a multiple of E tokens and is refused (use the 'position' layout, as its recipe does): a
  router family says so through `decode_refusal`.
  Expert choice and Soft MoE are non-causal with this layout and would see a group of one token.
- group_layout 'position': a group is the tokens at one position of `group_size` sequences, as
  in training, so the B rows must be a multiple of group_size; decoding position t routes
  exactly the group a full forward pass routes at t. Every router, expert choice and Soft MoE
  included, then gives the same outputs as recomputing the whole sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.moe_layer import MoELayer

_CACHE_AXES = ("batch", "length", "act_heads", None)


def init_cache(model, batch: int, max_len: int) -> list[dict[str, jax.Array]]:
  """Zero caches in the model's compute dtype, one {"k", "v"} per Block module.

  Per layer [B, max_len, G, K] (G key/value heads); for a scanned model one cache per unit
  position, stacked like its parameters: [num_layers / unit, B, max_len, G, K].
  """
  caches = []
  for block in model.block_modules():
    *stacked, kv_heads, head_dim = block.attention.cache_shape()
    shape = (*stacked, batch, max_len, kv_heads, head_dim)
    axes = (None,) * len(stacked) + _CACHE_AXES
    zeros = sharding.constrain(jnp.zeros(shape, model.dtype), axes, model.rules)
    caches.append({"k": zeros, "v": zeros})
  return caches


def prepare_for_decoding(model) -> None:
  """Sets the routing groups of the decode-time MoE calls (see the module docstring).

  Call once on a freshly merged model before `forward_with_cache`. Raises ValueError for a
  router that cannot route groups of one token.
  """
  for block in model.block_modules():
    if isinstance(block.ffn, MoELayer) and block.ffn.settings.group_layout == "sequence":
      router = block.ffn.router
      refusal = router.decode_refusal(router.options, block.ffn.settings)
      if refusal:
        raise ValueError(refusal)
      # One new token is one routing group.
      block.ffn.settings = dataclasses.replace(block.ffn.settings, group_size=1)


def _decode_block(block, x, layer_cache, offset, tokens_bl, rules):
  attn_out, layer_cache = block.attention.decode(block.attn_norm(x), layer_cache, offset)
  x = x + attn_out
  h = block.ffn_norm(x)
  if isinstance(block.ffn, MoELayer):
    y, _, _ = block.ffn(h, train=False, rng=None, token_ids_bl=tokens_bl)
  else:
    y = block.ffn(h)
  return sharding.constrain(x + y, ("batch", "length", "act_embed"), rules), layer_cache


def forward_with_cache(model, tokens_bl, cache, offset):
  """Logits of new tokens and the updated cache.

  Args:
    model: a `Transformer` (merged), after `prepare_for_decoding`.
    tokens_bl: int32 [B, L] new tokens at positions offset..offset+L-1.
    cache: from `init_cache` (or a previous call), positions < offset filled.
    offset: int32 scalar (may be traced): number of positions already in the cache.

  Returns:
    (logits float32 [B, L, V], new cache).
  """
  x = jnp.take(model.embed[...], tokens_bl, axis=0).astype(model.dtype)
  x = sharding.constrain(x, ("batch", "length", "act_embed"), model.rules)
  if model.scanned:
    # A plain lax.scan over the split stack: the sampler merges the model once outside its
    # decoding loop, and decoding updates no module state.
    graphdef, stack_state = nnx.split(model.stack)

    def body(x, xs):
      unit_state, unit_cache = xs
      new_cache = []
      for block, layer_cache in zip(nnx.merge(graphdef, unit_state), unit_cache, strict=True):
        x, layer_cache = _decode_block(block, x, layer_cache, offset, tokens_bl, model.rules)
        new_cache.append(layer_cache)
      return x, new_cache

    x, new_cache = jax.lax.scan(body, x, (stack_state, list(cache)))
  else:
    new_cache = []
    for block, layer_cache in zip(model.blocks, cache, strict=True):
      x, layer_cache = _decode_block(block, x, layer_cache, offset, tokens_bl, model.rules)
      new_cache.append(layer_cache)
  return model.logits(model.final_norm(x)), new_cache
