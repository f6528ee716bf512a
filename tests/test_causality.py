"""Causality of the decoder LM for every registered router (see docs/causality.md).

A decoder is causal when the logits at position t depend only on tokens 0..t. Attention is
masked, but a router that makes the tokens of a routing group compete (capacity, expert choice)
or mixes them (Soft MoE) can carry information from a later token to an earlier one of the same
group. For every router family in `routers.families()` (collected at import time, so families
registered later are covered automatically), with the MoE settings of its recipe's tiny preset:
  two token batches that differ only at positions > t must give equal logits at positions <= t,
in every layout the router declares causal (`group_layout='position'` always; 'sequence' only
when `causal_in_sequence` says so), in eval mode and in train mode with a fixed rng.
A layout the family's own check refuses (SMEAR needs 'sequence') is not a case; every family has
at least one. Then the leak itself is measured for every family or option declared non-causal in
the 'sequence' layout (allowed by `allow_noncausal=True`): expert choice, Soft MoE, SMEAR's
per-example mean and batch-prioritized Switch change earlier positions' logits under the same
perturbation in both modes; PEER's query batch norm only at training (evaluation uses the running
statistics and is causal).
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib
from moejax.model import routers
from moejax.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, LENGTH, LAST_SHARED = 8, 8, 3  # the two batches agree on positions 0..3
POSITION_GROUP = 4  # group_layout 'position': 4 sequences per group, 2 groups per position
SEQUENCE_GROUP = LENGTH  # group_layout 'sequence': a group is exactly one sequence
ATOL = 1e-6
# Size overrides; every other model.moe key comes from the router's recipe (tiny preset).
NOT_FROM_RECIPE = ("group_size", "group_layout", "allow_noncausal")


def _load_recipes() -> dict:
  """Router name -> `model.moe` of the first configs/*.py (by file name) whose tiny preset uses
  it. Config files that fail to load are ignored here (test_config covers them)."""
  recipes = {}
  for path in sorted((ROOT / "configs").glob("*.py")):
    try:
      spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      moe = module.get_config("tiny").model.moe
    except Exception:  # noqa: BLE001 - a broken recipe is another test's failure
      continue
    recipes.setdefault(routers.family(moe.router), moe)
  return recipes


RECIPES = _load_recipes()


def make_config(name: str, layout: str, allow_noncausal: bool = False, **options):
  """A one-layer LM (attention + MoE; deeper stacks are causal by induction) with router `name`,
  the MoE settings of its recipe and `options` of its family."""
  c = config_lib.default_config()
  m, moe, t = c.model, c.model.moe, c.train
  if name in RECIPES:
    for key, value in RECIPES[name].items():
      if key not in NOT_FROM_RECIPE:
        moe[key] = value.to_dict() if hasattr(value, "to_dict") else value
  moe.router = name
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 64, 1, 32, 2, 64
  m.moe_every = 1
  m.init_std = 0.1  # larger than the default 0.02, so the MoE output (and any leak) is not tiny
  if moe.d_expert:  # a recipe's expert width (PEER's single neurons), at most this model's d_ff
    moe.d_expert = min(moe.d_expert, m.d_ff)
  if "init_std" in moe[name]:
    moe[name].init_std = 0.5  # decisive routing, so a leak would flip choices
  for key, value in options.items():
    moe[name][key] = value
  moe.group_layout, moe.allow_noncausal = layout, allow_noncausal
  moe.group_size = POSITION_GROUP if layout == "position" else SEQUENCE_GROUP
  if name == "base":  # BASE needs group_size % num_experts == 0 (S/E tokens per expert)
    moe.num_experts = 2
  t.batch_size, t.seq_len = BATCH, LENGTH
  return c


def _cases():
  """(router, layout) pairs to check; resolved at collection time from the registry."""
  cases = []
  for name, cls in sorted(routers.families().items()):
    family_cases = []
    for layout in ("sequence", "position"):
      moe = make_config(name, layout).model.moe
      try:
        options = routers.options(moe)  # the family's check of this layout
      except config_lib.ConfigError:
        continue
      if layout == "position" or cls.causal_in_sequence(options, routers.settings(moe)):
        family_cases.append(pytest.param(name, layout, id=f"{name}-{layout}"))
    assert family_cases, f"router {name!r} refuses every group layout"
    cases += family_cases
  return cases


def token_batches(seed: int = 0):
  """Two [B, L] batches equal at positions <= LAST_SHARED and different at every later one."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 64, size=(BATCH, LENGTH))
  b = a.copy()
  b[:, LAST_SHARED + 1 :] = (a[:, LAST_SHARED + 1 :] + rng.integers(1, 64, size=(BATCH, 4))) % 64
  return jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)


def make_forward(cfg):
  """Pure forward over split state, so variables a router updates in training mode (such as a
  balancing bias) do not carry from one call to the next."""
  config_lib.validate(cfg, 1)
  graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))

  @functools.partial(jax.jit, static_argnames=("train",))
  def forward(state, tokens, rng, train):
    logits, _ = nnx.merge(graphdef, state)(tokens, train=train, rng=rng)
    return logits

  return functools.partial(forward, state)


def max_diffs(forward, train: bool):
  """(max |logit difference| at positions <= LAST_SHARED, the same at later positions)."""
  a, b = token_batches()
  rng = jax.random.key(1)
  diff = np.abs(np.asarray(forward(a, rng, train)) - np.asarray(forward(b, rng, train)))
  return float(diff[:, : LAST_SHARED + 1].max()), float(diff[:, LAST_SHARED + 1 :].max())


@pytest.mark.parametrize("name, layout", _cases())
def test_future_tokens_do_not_change_earlier_logits(name, layout):
  forward = make_forward(make_config(name, layout))
  for train in (False, True):
    past, future = max_diffs(forward, train)
    assert past <= ATOL, f"{name} ({layout}, {train=}) leaks the future: {past=}"
    assert future > 1e-3, f"{name} ({layout}, {train=}): the perturbation did nothing"


# (router, family options, modes that leak) for everything declared non-causal in 'sequence'.
LEAKY = [
  ("expert_choice", {}, (False, True)),
  ("soft_moe", {}, (False, True)),
  ("smear", {"level": "example"}, (False, True)),
  ("switch", {"batch_prioritized": True}, (False, True)),
  ("peer", {}, (True,)),
]


@pytest.mark.parametrize("name, options, leaky_modes", LEAKY, ids=[case[0] for case in LEAKY])
def test_leak_is_measured_with_sequence_groups(name, options, leaky_modes):
  """Within a sequence: earlier logits move when later tokens do, in the modes that leak (and
  the declaration says so: validation refuses the layout unless allow_noncausal)."""
  cfg = make_config(name, "sequence", **options)
  cls = routers.get(name)
  assert not cls.causal_in_sequence(routers.options(cfg.model.moe), routers.settings(cfg.model.moe))
  with pytest.raises(config_lib.ConfigError, match="allow_noncausal"):
    config_lib.validate(cfg, 1)
  forward = make_forward(make_config(name, "sequence", allow_noncausal=True, **options))
  for train in (False, True):
    past, _ = max_diffs(forward, train)
    if train in leaky_modes:
      assert past > 1e-2, f"{name} {options} with sequence groups ({train=}): {past=}, no leak"
    else:
      assert past <= ATOL, f"{name} {options} ({train=}) should be causal: {past=}"
