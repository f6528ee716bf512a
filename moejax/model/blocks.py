"""Transformer blocks and how the model runs them: a Python loop, or `nnx.scan` over a stack.

A block is pre-norm: x += attn(norm(x)); x += ffn(norm(x)), where ffn is a dense MLP or an MoE
layer. Layer i is MoE when (i + 1) % moe_every == 0, so the layers repeat with a period of
`moe_every` (the *unit*; 1 for a dense model): for moe_every 2 the unit is [dense, MoE].

Scanned layout (`model.scan_layers`): the model holds `unit` blocks whose variables have a
leading axis of num_layers / unit entries (logical axis `LAYER_AXIS`, replicated): block j of the
stack holds layers j, j + unit, j + 2 * unit, ... (`stack_blocks`). One scan step runs one unit,
so XLA compiles one unit whatever the depth. Parameters stay identical to the per-layer model
(they are built per layer with the same keys, then stacked), and every layer folds its own index
into the routing key, so both layouts compute the same function. Non-parameter state that a
router updates in the forward pass (DeepSeek's balance bias) is scanned like the parameters and
comes out updated.

Remat (`model.remat`, a policy name of moejax.ops.remat): each block call is wrapped in
`nnx.remat` with that policy, with or without scan.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.layers import RMSNorm
from moejax.model.moe_layer import MoELayer
from moejax.ops import remat as remat_lib

LAYER_AXIS = "layers"  # logical name of the stacked layer axis (replicated by default)


def is_moe_layer(index: int, moe_every: int, first_dense: int = 0) -> bool:
  """Layer `index` (0-based) is MoE when (index + 1) % moe_every == 0 (moe_every 2: 1, 3, ...)
  and it is not one of the `first_dense` first layers."""
  return moe_every > 0 and index >= first_dense and (index + 1) % moe_every == 0


def unit_size(moe_every: int) -> int:
  """Layers in one repeating unit: moe_every, or 1 for a dense model."""
  return moe_every if moe_every > 0 else 1


class Block(nnx.Module):
  def __init__(
    self, attention, ffn: nnx.Module, d_model: int, eps: float, rules=None, dtype=jnp.float32
  ):
    """`dtype`: the storage dtype of the norm scales."""
    self.attn_norm = RMSNorm(d_model, eps=eps, dtype=dtype)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model, eps=eps, dtype=dtype)
    self.ffn = ffn
    self.rules = rules

  def __call__(self, x_bld, *, train: bool, rng, token_ids_bl=None):
    """Returns (x [B, L, D], aux_losses {name: scalar}, metrics {name: array})."""
    x = x_bld + self.attention(self.attn_norm(x_bld))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoELayer):
      y, aux_losses, metrics = self.ffn(h, train=train, rng=rng, token_ids_bl=token_ids_bl)
    else:
      y, aux_losses, metrics = self.ffn(h), {}, {}
    x = sharding.constrain(x + y, ("batch", "length", "act_embed"), self.rules)
    return x, aux_losses, metrics


def stack_blocks(blocks: list[nnx.Module], unit: int) -> nnx.List:
  """Per-layer modules -> `unit` modules with stacked variables (block j: layers j, j+unit, ...).

  Each stacked variable gets the leading logical axis LAYER_AXIS in its `axes` metadata.
  """
  if len(blocks) % unit:
    raise ValueError(f"{len(blocks)} layers are not a whole number of units of {unit}")
  stacked = []
  for j in range(unit):
    group = blocks[j::unit]
    graphdef, first = nnx.split(group[0])
    states = [first] + [nnx.split(b)[1] for b in group[1:]]
    module = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, var in nnx.iter_graph(module):
      if isinstance(var, nnx.Variable):
        axes = var.get_metadata("axes", None)
        var.set_metadata("axes", (LAYER_AXIS, *(axes or (None,) * (var.ndim - 1))))
    stacked.append(module)
  return nnx.List(stacked)


def block_call(train: bool, remat: str, *, scanned: bool) -> Callable:
  """`(block, x, rng, token_ids) -> (x, losses, metrics)`, under `nnx.remat` unless 'none'."""

  def call(block, x_bld, rng, token_ids_bl):
    return block(x_bld, train=train, rng=rng, token_ids_bl=token_ids_bl)

  if remat == "none":
    return call
  # Inside a scan the loop already keeps XLA from merging recomputation into the forward pass.
  return nnx.remat(call, policy=remat_lib.remat_policy(remat), prevent_cse=not scanned)


def run_layers(blocks, x_bld, *, train: bool, rng, token_ids_bl, remat: str):
  """The per-layer loop. Returns (x, {loss: sum over layers}, {"layer_{i}/{name}": value})."""
  call = block_call(train, remat, scanned=False)
  losses, metrics = {}, {}
  for i, block in enumerate(blocks):
    layer_rng = None if rng is None else jax.random.fold_in(rng, i)
    x_bld, block_losses, block_metrics = call(block, x_bld, layer_rng, token_ids_bl)
    _collect(i, block_losses, block_metrics, losses, metrics)
  return x_bld, losses, metrics


def scan_layers(stack, x_bld, *, train: bool, rng, token_ids_bl, remat: str):
  """`run_layers` over a stack (`stack_blocks`), one unit per `nnx.scan` step; same outputs."""
  unit = len(stack)
  num_units = _num_units(stack)
  call = block_call(train, remat, scanned=True)

  def body(x, unit_blocks, u):
    outputs = []
    for j, block in enumerate(unit_blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, u * unit + j)
      x, block_losses, block_metrics = call(block, x, layer_rng, token_ids_bl)
      outputs.append((block_losses, block_metrics))
    return x, outputs

  scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
  x_bld, outputs = scan(x_bld, stack, jnp.arange(num_units, dtype=jnp.int32))
  losses, metrics = {}, {}
  for i in range(num_units * unit):  # layer order, as the loop sums
    stacked_losses, stacked_metrics = outputs[i % unit]
    u = i // unit
    _collect(
      i,
      {k: v[u] for k, v in stacked_losses.items()},
      {k: v[u] for k, v in stacked_metrics.items()},
      losses,
      metrics,
    )
  return x_bld, losses, metrics


def _num_units(stack) -> int:
  leaves = jax.tree.leaves(nnx.state(stack))
  return leaves[0].shape[0]


def _collect(layer: int, block_losses: dict, block_metrics: dict, losses: dict, metrics: dict):
  for name, value in block_losses.items():
    losses[name] = losses.get(name, 0.0) + value
    metrics[f"layer_{layer}/{name}"] = value
  for name, value in block_metrics.items():
    metrics[f"layer_{layer}/{name}"] = value
