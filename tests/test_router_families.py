"""The router families added on the router seam, as selectable families: registry, options from
the config, the families' own checks (one-line errors before compiling) and training steps
through the MoE layer and the whole model (aux losses, rule-updated state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, optim, train_step
from moejax.model import routers
from moejax.model.routers import hash_layers
from moejax.model.transformer import Transformer
from tests.family_configs import NEW_FAMILIES, family_config, write_counts


@pytest.mark.parametrize(
  "name, option, value",
  [
    ("hash", "seed", 7),
    ("top_p", "threshold", 0.3),
    ("relu", "l1_coef_multiplier", 1.5),
    ("random", "eval_choice", "ensemble"),
    ("smear", "init_std", 0.1),
    ("peer", "query_norm", "layer"),
    ("autonomy", "d_low", 4),
    ("switch", "batch_prioritized", True),
  ],
)
def test_options_come_from_the_config_section(name, option, value):
  cfg = family_config(name)
  cfg.model.moe[name][option] = value
  options = routers.options(cfg.model.moe)
  assert getattr(options, option) == value
  router = routers.registry.build(cfg.model.moe, d_model=64, rngs=nnx.Rngs(0))
  assert router.NAME == name and getattr(router.options, option) == value


def test_aliases_and_loss_weights():
  assert routers.family("thor") == "random" and routers.family("remoe") == "relu"
  assert routers.consistency(family_config("random").model.moe) == (2, 1.0)
  assert routers.consistency(family_config("hash").model.moe) == (1, 0.0)
  assert routers.loss_weights(family_config("top_p").model.moe) == {
    "dynamic_loss": 1e-4,
    "load_balance_loss": 1e-2,
  }
  assert routers.loss_weights(family_config("relu").model.moe) == {"relu_l1_loss": 1.0}
  for name in ("hash", "random", "smear", "peer"):
    assert routers.loss_weights(family_config(name).model.moe) == {}


def _set(cfg, key, value):
  *parents, last = key.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[last] = value


BAD = [
  ("hash", {"model.moe.top_k": 2}, r"model.moe.top_k=2: the hash router sends each token"),
  ("hash", {"model.moe.hash.table": "balanced"}, r"model.moe.hash.token_counts='': table="),
  ("hash", {"model.moe.hash.table": "lsh"}, r"model.moe.hash.table='lsh': use one of"),
  ("top_p", {"model.moe.top_p.max_experts": 5}, r"model.moe.top_p.max_experts=5 > model.moe"),
  ("top_p", {"model.moe.top_p.threshold": 1.0}, r"model.moe.top_p.threshold=1.0: must be in"),
  ("relu", {"model.moe.relu.max_experts": 9}, r"model.moe.relu.max_experts=9 > model.moe"),
  ("relu", {"model.moe.relu.l1_coef_multiplier": 1.0}, r"l1_coef_multiplier=1.0: must be > 1"),
  ("random", {"model.moe.random.level": "group"}, r"model.moe.random.level='group': use one"),
  ("smear", {"model.moe.group_layout": "position"}, r"model.moe.group_layout='position': the"),
  ("peer", {"model.moe.num_experts": 12}, r"model.moe.num_experts=12: the peer router's product"),
  ("peer", {"model.moe.top_k": 5}, r"model.moe.top_k=5: each peer head retrieves at most"),
  ("peer", {"model.moe.d_expert": None}, r"model.moe.d_expert=None: peer experts are single"),
  ("peer", {"model.moe.peer.query_dim": 7}, r"model.moe.peer.query_dim=7: must be even"),
  ("autonomy", {"model.moe.d_expert": None}, r"model.moe.d_expert=None: the autonomy router"),
  # Families the causality guard refuses in the 'sequence' layout.
  ("peer", {"model.moe.group_layout": "sequence", "model.moe.group_size": 32}, "allow_noncausal"),
  ("smear", {"model.moe.smear.level": "example"}, "allow_noncausal"),
  ("switch", {"model.moe.switch.batch_prioritized": True}, "allow_noncausal"),
  ("top_p", {"model.moe.dispatch": "capacity"}, "allow_noncausal"),
]


@pytest.mark.parametrize(
  "name, changes, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_config_errors_are_one_line_before_compiling(name, changes, message):
  cfg = family_config(name)
  for key, value in changes.items():
    _set(cfg, key, value)
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(cfg, 1)
  assert "\n" not in str(info.value)


def test_missing_or_bad_counts_file(tmp_path):
  cfg = family_config("hash")
  cfg.model.moe.hash.table = "balanced"
  cfg.model.moe.hash.token_counts = str(tmp_path / "nothing.npy")
  with pytest.raises(config_lib.ConfigError, match="nothing.npy'.*no such file; write it with"):
    config_lib.validate(cfg, 1)
  np.save(tmp_path / "neg.npy", np.array([3, -1, 2]))
  cfg.model.moe.hash.token_counts = str(tmp_path / "neg.npy")
  with pytest.raises(config_lib.ConfigError, match="counts must be finite and >= 0"):
    config_lib.validate(cfg, 1)


def _train(cfg, steps: int):
  """`steps` jitted train steps on one fixed batch; (losses, metrics of the last, first and last
  model_state)."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.new_train_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), opt, 0)
  step = jax.jit(
    train_step.make_train_step(
      graphdef,
      opt,
      routers.loss_weights(cfg.model.moe),
      optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
      consistency=routers.consistency(cfg.model.moe),
    )
  )
  key = jax.random.key(0)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  tokens = jax.random.randint(key, (shape[0], shape[1] + 1), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  first_state, losses = state["model_state"], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["cross_entropy"]))
  return losses, metrics, first_state, state["model_state"]


def _router_state(model_state, name):
  return model_state["blocks"][1]["ffn"]["router"][name]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_each_family_trains_through_the_model(name, tmp_path):
  cfg = family_config(name)
  cfg.optim.learning_rate = 1e-2
  if name == "hash":
    cfg.model.moe.hash.table = "balanced"
    cfg.model.moe.hash.token_counts = write_counts(tmp_path / "c.npy", cfg.model.vocab_size)
  config_lib.validate(cfg, 1)
  losses, metrics, first, last = _train(cfg, 6)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
  cls = routers.get(name)
  for loss in cls.AUX_LOSSES:
    assert np.isfinite(float(metrics[loss])) and f"layer_1/{loss}" in metrics
  if name == "random":  # two passes: the cross-entropy is their sum, plus the consistency term
    assert float(metrics["consistency_loss"]) > 0
  if name == "relu":  # lambda moved by the multiplier once per step, starting at 1e-8
    ratio = float(_router_state(last, "l1_coef")) / float(_router_state(first, "l1_coef"))
    assert np.isclose(np.log(ratio) / np.log(1.2) % 1, 0, atol=1e-4) or np.isclose(
      np.log(ratio) / np.log(1.2) % 1, 1, atol=1e-4
    )
    assert ratio != 1.0
  if name == "peer":  # query batch norm's running statistics moved
    assert not np.allclose(_router_state(last, "running_mean"), 0.0)
  if name == "hash":  # the table is state, never changed by training
    np.testing.assert_array_equal(_router_state(last, "table"), _router_state(first, "table"))
  if name == "random":
    np.testing.assert_array_equal(_router_state(last, "eval_key"), _router_state(first, "eval_key"))


def test_moe_layer_passes_token_and_sequence_ids():
  """A READS_TOKENS router sees the ids grouped like the hidden states, in both layouts."""
  for layout, group_size in (("sequence", 16), ("position", 4)):
    cfg = family_config("hash")
    cfg.model.moe.group_layout, cfg.model.moe.group_size = layout, group_size
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    layer = model.blocks[1].ffn
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.model.vocab_size)
    x = jax.random.normal(jax.random.key(2), (8, 32, 64))
    _, routing = layer.route(x, train=False, rng=None, token_ids_bl=tokens)
    rows = jnp.broadcast_to(jnp.arange(8)[:, None], (8, 32))
    expected = hash_layers.hash_experts(layer.to_groups(tokens), 4)
    np.testing.assert_array_equal(routing.expert_index, expected)
    assert layer.to_groups(rows).shape == routing.expert_index.shape
