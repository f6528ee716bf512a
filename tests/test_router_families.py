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
  """`steps` jitted train steps on one fixed batch; (losses, every step's metrics, the first and
  last model_state)."""
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
  first_state, losses, history = state["model_state"], [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["cross_entropy"]))
    history.append(jax.device_get(metrics))
  return losses, history, first_state, state["model_state"]


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
  losses, history, first, last = _train(cfg, 6)
  metrics = history[-1]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
  cls = routers.get(name)
  for loss in cls.AUX_LOSSES:
    assert np.isfinite(float(metrics[loss])) and f"layer_1/{loss}" in metrics
  if name == "random":  # two passes: the cross-entropy is their sum, plus the consistency term
    assert float(metrics["consistency_loss"]) > 0
  if name == "relu":  # lambda: x1.2 after a step denser than 1 - k/E = 0.75, else /1.2
    assert float(_router_state(first, "l1_coef")) == np.float32(1e-8)
    coefs = [float(m["layer_1/l1_coef"]) for m in history] + [float(_router_state(last, "l1_coef"))]
    for t, m in enumerate(history):
      factor = 1.2 if float(m["layer_1/sparsity"]) < 0.75 else 1 / 1.2
      np.testing.assert_allclose(coefs[t + 1], coefs[t] * factor, rtol=1e-6)
      assert float(m["layer_1/target_sparsity"]) == 0.75
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


def _ffn(bank, e, x):
  """Expert e of an ExpertBank (GELU, no gate) on one token, float64."""
  w_in, w_out = (np.asarray(bank.weights()[k][e], np.float64) for k in ("w_in", "w_out"))
  return np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x, np.float64) @ w_in)), np.float64) @ w_out


def _kept_top_p(logits, threshold, max_experts):
  """Experts by decreasing p while the mass before them is <= P; gates = p."""
  p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  kept, mass = [], 0.0
  for e in sorted(range(len(p)), key=lambda e: -p[e])[:max_experts]:
    if mass > threshold:
      break
    kept.append((e, p[e]))
    mass += p[e]
  return kept


def _kept_relu(logits, max_experts):
  """The positive ReLU gates, largest first, at most k_max."""
  positive = sorted((e for e in range(len(logits)) if logits[e] > 0), key=lambda e: -logits[e])
  return [(e, logits[e]) for e in positive[:max_experts]]


@pytest.mark.parametrize("name", ["top_p", "relu"])
def test_dynamic_token_choice_layers_equal_a_per_token_loop(name):
  """top_p and relu through the MoE layer (dropless): y = sum over each token's kept experts of
  gate * expert(x), the kept set found per token by plain python."""
  cfg = family_config(name)
  cfg.model.moe[name].init_std = 0.3
  if name == "top_p":
    cfg.model.moe.top_p.max_experts = 3
  layer = Transformer(cfg.model, rngs=nnx.Rngs(0)).blocks[1].ffn
  x = jax.random.normal(jax.random.key(0), (2, 32, 64))
  y, _, metrics = layer(x, train=False, rng=None)
  x_td = np.asarray(x, np.float64).reshape(-1, 64)
  logits = x_td @ np.asarray(layer.router.kernel[...], np.float64)
  expected, counts = np.zeros_like(x_td), []
  for t, row in enumerate(logits):
    kept = _kept_top_p(row, 0.4, 3) if name == "top_p" else _kept_relu(row, 4)
    counts.append(len(kept))
    for e, gate in kept:
      expected[t] += gate * _ffn(layer.experts, e, x_td[t])
  assert len(set(counts)) > 1  # a dynamic number of experts per token
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 64), expected, atol=1e-4, rtol=1e-4)
  key = "experts_per_token" if name == "top_p" else "active_experts_per_token"
  np.testing.assert_allclose(metrics[key], np.mean(counts), rtol=1e-5)
