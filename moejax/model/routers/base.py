"""The router seam: the base class of every router family and the helpers they share.

A router family is one file in this package: the pure routing function of one group first, then
an `Options` dataclass (its config keys, `model.moe.<name>.<field>`), then the NNX module that
owns its parameters, registered by name with `@registry.register`. Everything the rest of moejax
needs to know about a family is declared on its class:
- `Options`: a frozen dataclass; field defaults are the config defaults. A `RouterOptions`
  subclass declares each field's valid values with `option(default, ge=..., choices=...)` and
  checks them on construction (messages start with `field=value`). Every loss in `AUX_LOSSES`
  has a float option `<loss>_weight`: the train step adds weight * loss.
- `check(options, moe)`: settings the family cannot route with (raises `errors.ConfigError`).
- `capacity(S, capacity_factor)`: slots per expert per group for the capacity dispatches; a
  family whose slots depend only on S, E and the factor names its rule in `CAPACITY_RULE`.
- `causal_in_sequence(options, moe)`: whether a token's output is independent of later tokens of
  its routing group with the 'sequence' layout (validation refuses a non-causal decoder); no by
  default, so a family that is never causal says why in its class docstring.
- `READS_EXPERT_WEIGHTS`: the layer passes `experts=` (its ExpertBank) to `__call__`.
- `dispatch_experts(experts)`: what the dispatch runs on the buffers, the layer's ExpertBank by
  default; a family whose experts are not plain FFNs over the bank (Autonomy's low-rank gate)
  returns an object with the bank's `__call__(buf)` and `weights()`.
- `READS_TOKENS`: the layer passes `token_ids=` and `sequence_ids=` (int32 [G, S]: each token's
  input id and its row in the global batch) to `__call__` (hash routing, per-sequence draws).
- `COMPUTES_OUTPUT`: the family computes the layer's output itself (`compute`: merged experts,
  product-key experts, low-rank gates) instead of a dispatch.
- `CONSISTENCY_PASSES`: 2 makes the train step run the model twice (different router draws) and
  add `consistency_loss_weight` (an option) times the symmetric KL of the two passes' logits.
- `decode_refusal(options, moe)`: why KV-cache decoding (groups of one new token with the
  'sequence' layout) cannot work for this family, or None.
- `upcycle_refusal(options, noise)`: why sparse upcycling from exact copies cannot work.
- Instances keep their options as `self.options`.
The routing types themselves (`SparseRouting`, `SoftRouting`) live in `moejax/ops/routing.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import errors
from moejax.ops import capacity as capacity_lib
from moejax.ops import routing as routing_lib
from moejax.ops.routing import SoftRouting, SparseRouting  # noqa: F401 - re-exported for routers

average_over_groups = routing_lib.average_over_groups
top_k = routing_lib.top_k  # partitionable top-k for routers


@dataclasses.dataclass(frozen=True)
class MoESettings:
  """The `model.moe` values every router may read (static, hashable)."""

  num_experts: int
  top_k: int
  group_size: int
  group_layout: str = "sequence"
  dispatch: str = "capacity"
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  eval_dispatch: str | None = None  # the dispatch at evaluation; None = `dispatch`
  exchange_factor: float = 2.0  # expert-parallel dropless: per-destination send bound
  # model.moe.d_expert as configured: the expert bank's hidden width; None = model.d_ff, which
  # routers do not see (a family that needs the width, such as PEER's single neurons, asks for it).
  d_expert: int | None = None

  def dispatch_for(self, train: bool) -> str:
    return self.dispatch if train or self.eval_dispatch is None else self.eval_dispatch


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a family that has none."""


@dataclasses.dataclass(frozen=True)
class _Valid:
  """The values an option accepts: bounds (ge/gt lower, lt upper) or a tuple of choices."""

  ge: float | None = None
  gt: float | None = None
  lt: float | None = None
  choices: tuple | None = None
  note: str = ""

  def problem(self, value) -> str | None:
    """What is wrong with `value` (the end of the error message), or None. NaN fails bounds."""
    if self.choices is not None:
      return None if value in self.choices else f"use one of {self.choices}"
    low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
    if low_ok and (self.lt is None or value < self.lt):
      return None
    if self.lt is None:
      rule = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
    elif self.ge is None and self.gt is None:
      rule = f"< {self.lt:g}"
    else:
      low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}"
      rule = f"in {low}, {self.lt:g})"
    return f"must be {rule}" + (f" ({self.note})" if self.note else "")


def option(default, *, ge=None, gt=None, lt=None, choices=None, note: str = ""):
  """A `RouterOptions` field with its valid values: ge <= value, gt < value, value < lt, or
  value in choices; `note` ends the error message (e.g. what the bound means)."""
  valid = _Valid(ge=ge, gt=gt, lt=lt, choices=choices, note=note)
  return dataclasses.field(default=default, metadata={"valid": valid})


@dataclasses.dataclass(frozen=True)
class RouterOptions:
  """Base of the Options dataclasses whose fields declare their valid values with `option`.

  A subclass with checks that involve several fields overrides `__post_init__` and calls
  `super().__post_init__()` first.
  """

  def __post_init__(self):
    for field in dataclasses.fields(self):
      valid = field.metadata.get("valid")
      value = getattr(self, field.name)
      problem = None if valid is None else valid.problem(value)
      if problem:
        shown = repr(value) if isinstance(value, str) else value
        raise ValueError(f"{field.name}={shown}: {problem}")


class Router(nnx.Module):
  """Base class of the router families (see the module docstring for the contract)."""

  NAME: ClassVar[str] = ""  # set by registry.register
  Options: ClassVar[type] = NoOptions
  AUX_LOSSES: ClassVar[tuple[str, ...]] = ()
  READS_EXPERT_WEIGHTS: ClassVar[bool] = False
  READS_TOKENS: ClassVar[bool] = False
  COMPUTES_OUTPUT: ClassVar[bool] = False
  CONSISTENCY_PASSES: ClassVar[int] = 1
  # (S, E, capacity_factor) -> slots per expert, for `capacity`; None: no capacity rule of its own.
  CAPACITY_RULE: ClassVar[Callable[[int, int, float], int] | None] = None

  @classmethod
  def check(cls, options, moe: MoESettings) -> None:
    """Raises errors.ConfigError for settings this family cannot route with."""
    del options, moe

  @classmethod
  def causal_in_sequence(cls, options, moe: MoESettings) -> bool:
    """Whether outputs never depend on later tokens of the group (default: no, be safe)."""
    del options, moe
    return False

  @classmethod
  def decode_refusal(cls, options, moe: MoESettings) -> str | None:
    """A one-line reason why groups of one new token cannot be routed, or None."""
    del options, moe
    return None

  @classmethod
  def upcycle_refusal(cls, options, noise: float) -> str | None:
    """Why experts started as copies of one dense MLP (relative noise `noise`) cannot
    specialise under this family, or None (moejax/upcycle.py)."""
    del options, noise
    return None

  @classmethod
  def loss_weights(cls, options) -> dict[str, float]:
    """{loss name: weight} from the `<loss>_weight` options."""
    return {name: float(getattr(options, f"{name}_weight")) for name in cls.AUX_LOSSES}

  @classmethod
  def make(cls, *, d_model: int, rngs: nnx.Rngs, **values) -> Router:
    """Builds a router from keyword values: MoESettings fields and the family's options.

    For tests and notebooks: `TopKRouter.make(d_model=8, num_experts=4, top_k=2, rngs=rngs,
    jitter_eps=0.1)`; unset settings take the MoESettings defaults (group_size 1).
    """
    setting_names = {f.name for f in dataclasses.fields(MoESettings)}
    settings = {k: v for k, v in values.items() if k in setting_names}
    options = cls.Options(**{k: v for k, v in values.items() if k not in setting_names})
    moe = MoESettings(**{"group_size": 1, **settings})
    return cls(d_model=d_model, moe=moe, options=options, rngs=rngs)

  def capacity(self, num_tokens: int, capacity_factor: float) -> int:
    """Slots per expert per group for the capacity dispatches (`CAPACITY_RULE` of S and E)."""
    rule = type(self).CAPACITY_RULE
    if rule is None:
      raise NotImplementedError(f"router {self.NAME!r} does not use capacity dispatch")
    return rule(num_tokens, self.num_experts, capacity_factor)

  def __call__(self, x_gsd: jax.Array, *, train: bool, rng: jax.Array | None = None):
    """Routes every group.

    Args:
      x_gsd: [G, S, D] tokens (any float dtype; routers compute in float32).
      train: training (noise, random draws, training capacity) or evaluation routing.
      rng: PRNG key of the family's training-time randomness; None where it has none.
      (READS_TOKENS families also take `token_ids` and `sequence_ids`, int32 [G, S].)

    Returns:
      SparseRouting with [G, N] array fields (or SoftRouting with [G, S, slots] weights) and
      group-averaged aux losses and metrics. Each family's docstring says what N is and what
      `train` and `rng` do there.
    """
    raise NotImplementedError(f"router {self.NAME!r} has no __call__")

  def dispatch_experts(self, experts):
    """The experts the dispatch runs (`__call__(buf [G, E, C, D])` and `weights()`)."""
    return experts

  def compute(self, x_gsd, routing, experts, *, train: bool):
    """(y [G, S, D], metrics) of a family with COMPUTES_OUTPUT (its own expert computation)."""
    raise NotImplementedError(f"router {self.NAME!r} leaves the output to a dispatch")


class TokenChoiceRouter(Router):
  """Base of the families where each token picks its top_k experts.

  Capacity ceil(cf * S * k / E). Causal in a sequence for k = 1, or with the dropless dispatch
  (no capacity competition). For k > 1 with capacity, all first choices precede all second
  choices, so a later token's first choice can push out an earlier token's second choice.
  """

  num_experts: int
  top_k: int

  @classmethod
  def causal_in_sequence(cls, options, moe: MoESettings) -> bool:
    del options
    return moe.top_k == 1 or moe.dispatch == "dropless"

  def capacity(self, num_tokens: int, capacity_factor: float) -> int:
    return capacity_lib.token_choice_capacity(
      num_tokens, self.num_experts, self.top_k, capacity_factor
    )


class DynamicTokenChoiceRouter(TokenChoiceRouter):
  """Base of the token-choice families with 1..`options.max_experts` experts per token (top_p,
  relu): max_experts <= E, capacity sized for model.moe.top_k, and causal in a sequence with
  max_experts = 1 or the dropless dispatch (as top-k with k > 1 otherwise)."""

  @classmethod
  def check(cls, options, moe: MoESettings) -> None:
    if options.max_experts > moe.num_experts:
      raise errors.ConfigError(
        f"model.moe.{cls.NAME}.max_experts={options.max_experts} > model.moe.num_experts="
        f"{moe.num_experts}; use at most {moe.num_experts}"
      )

  @classmethod
  def causal_in_sequence(cls, options, moe: MoESettings) -> bool:
    return options.max_experts == 1 or moe.dispatch == "dropless"


def need_one_expert_per_token(name: str, moe: MoESettings, why: str) -> None:
  """errors.ConfigError unless model.moe.top_k = 1, for families that route each token to one
  expert; `why` says so in the family's terms."""
  if moe.top_k != 1:
    raise errors.ConfigError(
      f"model.moe.top_k={moe.top_k}: the {name} router {why}; set model.moe.top_k=1"
    )


def check_top_k(top_k: int, num_experts: int) -> None:
  """ValueError unless 1 <= top_k <= num_experts (an argument check of the pure functions)."""
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"need 1 <= {top_k=} <= {num_experts=}")


def chosen_indicator(expert_sk: jax.Array, num_experts: int) -> jax.Array:
  """float32 [S, E]: 1 where expert e is among token s's K choices (distinct, so the sum of the
  K one-hots is 0/1), else 0."""
  return jnp.sum(jax.nn.one_hot(expert_sk, num_experts, dtype=jnp.float32), axis=1)


def softmax_top_k(scores_se: jax.Array, top_k: int, *, normalize: bool):
  """Each token's top_k experts by p = softmax(scores) over the E experts, in float32.

  Args:
    scores_se: float[S, E] router scores (logits, norms, ...).
    top_k: K, experts per token, 1 <= K <= E.
    normalize: renormalise each token's K gates to sum to 1.

  Returns:
    (probs_se [S, E], gate_sk [S, K] p at the choices (renormalised with `normalize`),
    expert_sk int[S, K] the choices by decreasing p, chosen_se [S, E] `chosen_indicator`).
  """
  num_experts = scores_se.shape[-1]
  check_top_k(top_k, num_experts)
  probs_se = jax.nn.softmax(scores_se.astype(jnp.float32), axis=-1)
  gate_sk, expert_sk = routing_lib.top_k(probs_se, top_k)
  if normalize:
    gate_sk = gate_sk / jnp.sum(gate_sk, axis=-1, keepdims=True)
  return probs_se, gate_sk, expert_sk, chosen_indicator(expert_sk, num_experts)


def rank_major_routing(
  expert_sk: jax.Array,
  weight_sk: jax.Array,
  valid_sk: jax.Array | None = None,
  *,
  aux_losses: dict[str, jax.Array],
  metrics: dict[str, jax.Array],
) -> SparseRouting:
  """The SparseRouting of per-token choices, in choice-rank-major pair order.

  Args:
    expert_sk: int[S, K] each token's chosen experts, best first.
    weight_sk: float[S, K] their combine weights.
    valid_sk: bool[S, K] which choices claim anything; None means all.
    aux_losses: the router's unweighted losses.
    metrics: the router's logged statistics.

  Returns:
    SparseRouting with N = S*K pairs; pair r*S + s is token s's (r+1)-th choice.
  """
  num_tokens, num_choices = expert_sk.shape
  if valid_sk is None:
    valid_sk = jnp.ones(expert_sk.shape, bool)
  # [S, K] -> [K, S] -> [N].
  return SparseRouting(
    token_index=jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), num_choices),
    expert_index=expert_sk.T.reshape(-1).astype(jnp.int32),
    combine_weight=weight_sk.T.reshape(-1).astype(jnp.float32),
    valid=valid_sk.T.reshape(-1),
    aux_losses=aux_losses,
    metrics=metrics,
  )


def router_kernel(rngs: nnx.Rngs, d_model: int, num_experts: int, init_std: float) -> nnx.Param:
  """A float32 [D, E] router matrix, normal(init_std); experts are few, so E stays replicated."""
  init = jax.nn.initializers.normal(stddev=init_std)
  return nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32), axes=("embed", None))


def router_logits(x_gsd: jax.Array, kernel_de: jax.Array) -> jax.Array:
  """float32 [G, S, E] = x W, in true float32 (HIGHEST: not bf16/TF32 where that is default)."""
  return jnp.einsum(
    "gsd,de->gse",
    x_gsd.astype(jnp.float32),
    kernel_de.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )


def route_groups(route: Callable, *per_group: jax.Array, rng: jax.Array | None = None):
  """vmaps `route(*arrays_of_one_group[, rng=key])` over the leading G axis, averages losses.

  With `rng`, each group gets its own key (split from `rng`) as the keyword argument `rng`.
  """
  if rng is None:
    routing = jax.vmap(route)(*per_group)
  else:
    keys = jax.random.split(rng, per_group[0].shape[0])
    routing = jax.vmap(lambda *a: route(*a[:-1], rng=a[-1]))(*per_group, keys)
  return average_over_groups(routing)


def need_rng(rng: jax.Array | None, why: str) -> jax.Array:
  """`rng`, or a ValueError naming what needed it (a caller bug, not a user error)."""
  if rng is None:
    raise ValueError(f"{why} needs an rng to train")
  return rng
