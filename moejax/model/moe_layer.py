"""The MoE block: router -> dispatch -> expert bank -> combine.

Tokens are split into routing groups of `group_size` tokens, fixed by config, never by the number
of devices, so the model function is the same on any mesh. Two layouts:
- "sequence": consecutive tokens of the flattened [batch * length] stream;
- "position": tokens at the same position of different sequences (the group never holds a
  sequence's future, so even routers that mix tokens, such as expert choice, stay causal).
The router returns a `Routing` (moejax/ops/routing.py). Sparse routings go through a dispatch
implementation from `DISPATCHES` with the capacity the router asks for
(`router.capacity(S, capacity_factor)`); soft routings through `ops/soft.py`. Dropped tokens get
zero output, so the block's residual carries them.

Probes (analysis code outside the core, e.g. the MoE-X project's wide hidden code) use the steps
the layer is made of: `route` (groups + routing), `kept_pairs` (what the dispatch computes of
that routing) and `from_groups` (back to [B, L, ...]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.experts import ExpertBank
from moejax.model.routers import base
from moejax.ops import all_to_all, capacity, dropless_dispatch, soft

# Dispatch implementations of sparse routing, by `model.moe.dispatch`.
DISPATCHES = {
  "capacity": capacity.capacity_moe,
  "dropless": dropless_dispatch.dropless_moe,
  "all_to_all": all_to_all.all_to_all_moe,
}
GROUP_LAYOUTS = ("sequence", "position")
# The per-group arrays (leading G axis) of each routing type.
_ROUTING_FIELDS = {
  base.SoftRouting: ("dispatch_weights", "combine_weights"),
  base.SparseRouting: ("token_index", "expert_index", "combine_weight", "valid"),
}


class MoELayer(nnx.Module):
  """Args: the router module, the expert bank, the MoE settings, optional shared experts (a
  dense MLP every token uses, DeepSeekMoE) and the sharding rules."""

  def __init__(
    self,
    *,
    router: base.Router,
    experts: ExpertBank,
    settings: base.MoESettings,
    shared_experts: nnx.Module | None = None,
    rules: sharding.Rules | None = None,
  ):
    if settings.dispatch not in DISPATCHES:
      raise ValueError(f"unknown dispatch {settings.dispatch!r}; known: {sorted(DISPATCHES)}")
    if settings.group_layout not in GROUP_LAYOUTS:
      raise ValueError(f"unknown group_layout {settings.group_layout!r}; known: {GROUP_LAYOUTS}")
    self.router = router
    self.experts = experts
    self.settings = settings
    self.shared_experts = shared_experts
    self.rules = rules

  def route(self, x_bld, *, train: bool, rng: jax.Array | None, token_ids_bl=None):
    """(x_gsd [G, S, D] the routing groups, routing) of this layer's input [B, L, D].

    token_ids_bl: int32 [B, L] the model's input ids, for routers that READS_TOKENS.
    """
    x_gsd = self.to_groups(x_bld)
    extra = {"experts": self.experts} if self.router.READS_EXPERT_WEIGHTS else {}
    if self.router.READS_TOKENS:
      if token_ids_bl is None:
        raise ValueError(f"router {self.router.NAME!r} reads the token ids: pass token_ids_bl")
      rows = jnp.arange(x_bld.shape[0], dtype=jnp.int32)[:, None]
      rows_bl = jnp.broadcast_to(rows, x_bld.shape[:2])
      extra["token_ids"] = self.to_groups(token_ids_bl.astype(jnp.int32))
      extra["sequence_ids"] = self.to_groups(rows_bl)
    routing = self.router(x_gsd, train=train, rng=rng, **extra)
    return x_gsd, self._constrain_routing(routing)

  def _constrain_routing(self, routing):
    """Every per-group routing array stays where its group lives (no gathered routing)."""
    fields = _ROUTING_FIELDS.get(type(routing))
    if fields is None:
      return routing
    names = lambda a: ("group",) + (None,) * (a.ndim - 1)
    updates = {
      f: sharding.constrain(getattr(routing, f), names(getattr(routing, f)), self.rules)
      for f in fields
    }
    return dataclasses.replace(routing, **updates)

  def capacity(self, num_tokens: int, *, train: bool) -> int:
    """Slots per expert per group of `num_tokens` for the capacity dispatches."""
    s = self.settings
    return self.router.capacity(num_tokens, s.capacity_factor if train else s.eval_capacity_factor)

  def kept_pairs(self, routing: base.SparseRouting, *, train: bool) -> jax.Array:
    """bool[G, N]: the pairs of `routing` the dispatch computes (all valid ones if dropless)."""
    if self.settings.dispatch_for(train) == "dropless":
      return routing.valid
    compute = functools.partial(
      capacity.compute_slots,
      num_experts=self.settings.num_experts,
      capacity=self.capacity(self.settings.group_size, train=train),
    )
    return jax.vmap(compute)(routing.expert_index, routing.valid)[1]

  def __call__(self, x_bld, *, train: bool, rng: jax.Array | None, token_ids_bl=None):
    """Returns (y [batch, length, d_model], aux_losses {name: scalar}, metrics {name: array}).

    token_ids_bl: int32 [B, L] the model's input ids (needed by routers that READS_TOKENS).
    """
    x_gsd, routing = self.route(x_bld, train=train, rng=rng, token_ids_bl=token_ids_bl)
    if self.router.COMPUTES_OUTPUT:
      y_gsd, dispatch_metrics = self.router.compute(x_gsd, routing, self.experts, train=train)
    else:
      y_gsd, dispatch_metrics = self._dispatch(x_gsd, routing, train=train)
    y = self.from_groups(y_gsd, x_bld.shape)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x_bld)
    return y, routing.aux_losses, {**routing.metrics, **dispatch_metrics}

  def _dispatch(self, x_gsd, routing, *, train: bool):
    """(y_gsd, metrics) from the configured dispatch, on groups padded to the group shards.

    Training shapes always split evenly (config_lib refuses others); a prompt or an evaluation
    of another length may not, so empty groups (no valid pair, zero weights) are appended and
    their outputs cut off again: every dispatch keeps running where each group lives.
    """
    num_groups = x_gsd.shape[0]
    pad = -num_groups % sharding.group_shards(self.rules)
    if pad:
      pad_groups = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
      fields = _ROUTING_FIELDS[type(routing)]
      updates = {f: pad_groups(getattr(routing, f)) for f in fields}
      routing = self._constrain_routing(dataclasses.replace(routing, **updates))
      x_gsd = sharding.constrain(pad_groups(x_gsd), ("group", None, "act_embed"), self.rules)
    num_experts = self.settings.num_experts
    if isinstance(routing, base.SoftRouting):
      y_gsd, metrics = soft.soft_moe(
        x_gsd, routing, self.experts, num_experts=num_experts, rules=self.rules
      )
    else:
      dispatch = self.settings.dispatch_for(train)
      # Evaluation never overflows the expert-parallel exchange (no factor: room for every pair).
      factor = self.settings.exchange_factor if train else None
      extra = {"exchange_factor": factor} if dispatch == "dropless" else {}
      y_gsd, metrics = DISPATCHES[dispatch](
        x_gsd,
        routing,
        self.router.dispatch_experts(self.experts),
        num_experts=num_experts,
        capacity=self.capacity(x_gsd.shape[1], train=train),
        rules=self.rules,
        **extra,
      )
    return y_gsd[:num_groups], metrics

  def to_groups(self, x_bld):
    """[B, L, ...] -> [G, S, ...] in the configured group layout."""
    batch, length = x_bld.shape[:2]
    rest = x_bld.shape[2:]
    s = self.settings.group_size
    if self.settings.group_layout == "position":
      if batch % s:
        raise ValueError(f"group_layout 'position' needs group_size={s} to divide batch={batch}")
      x_bld = jnp.swapaxes(x_bld, 0, 1)  # [L, B, ...]: a group = one position of S sequences
    elif (batch * length) % s:
      raise ValueError(f"group_size={s} must divide batch*length={batch * length}")
    names = ("group", None) + (("act_embed",) if rest else ())
    return sharding.constrain(x_bld.reshape(-1, s, *rest), names[: 2 + len(rest)], self.rules)

  def from_groups(self, y_gsd, shape_bld):
    """[G, S, K] -> [B, L, K] (the inverse of `to_groups`)."""
    batch, length, d = shape_bld
    if self.settings.group_layout == "position":
      y = jnp.swapaxes(y_gsd.reshape(length, batch, d), 0, 1)
    else:
      y = y_gsd.reshape(batch, length, d)
    return sharding.constrain(y, ("batch", "length", "act_embed"), self.rules)
