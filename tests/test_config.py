"""Config validation: each user error is one line naming the key, the value and the fix."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import pytest

from moejax import config_lib, memory
from moejax.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path, preset=""):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_switch_base_is_the_real_recipe():
  c = load_config("configs/switch_base.py")
  m = c.model
  assert (m.num_layers, m.d_model, m.num_heads, m.d_ff) == (12, 768, 12, 3072)
  assert (m.moe.num_experts, m.moe.top_k, m.moe.capacity_factor, m.moe_every) == (128, 1, 1.25, 2)
  config_lib.validate(c, 8)
  tiny = load_config("configs/switch_base.py", "tiny")
  assert tiny.model.moe.router == c.model.moe.router
  config_lib.validate(tiny, 1)


@pytest.mark.parametrize(
  "key, value, expected",
  [
    ("model.d_model", 0, "model.d_model=0: must be a positive"),
    ("train.batch_size", -4, "train.batch_size=-4"),
    ("model.moe.top_k", 9, "model.moe.top_k=9 > model.moe.num_experts=8"),
    ("model.moe.capacity_factor", 0.0, "model.moe.capacity_factor=0.0: must be > 0"),
    ("model.moe.router", "nope", "model.moe.router='nope' is not one of: "),
    ("model.activation", "tanh", "model.activation='tanh' is not one of: gelu, relu, swiglu"),
    ("model.moe.group_size", 100, "model.moe.group_size=100 does not divide"),
    ("mesh.rules.batch", "data,pod", "mesh.rules.batch='data,pod': unknown mesh axes ['pod']"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3 must divide model.num_heads=4"),
    ("model.remat", "some", "model.remat='some' is not one of: none, full, minimal"),
    ("model.attention_impl", "flash", "model.attention_impl='flash' is not one of: auto"),
    ("model.param_dtype", "float16", "model.param_dtype='float16' is not one of"),
    ("optim.moment_dtype", "int8", "optim.moment_dtype='int8' is not one of"),
    ("train.microbatches", 3, "train.microbatches=3 must divide train.batch_size=32"),
    ("train.loss_chunk", -1, "train.loss_chunk=-1: must be >= 0"),
    ("model.scan_layers", True, "model.num_layers=4 is not a multiple of 3"),
  ],
)
def test_bad_values_raise_one_line(key, value, expected):
  c = config_lib.default_config()
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  if key == "model.scan_layers":
    c.model.moe_every = 3
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c, 1)
  assert expected in str(err.value)
  assert "\n" not in str(err.value)


def test_microbatches_and_kv_heads_against_the_mesh():
  c = config_lib.default_config()
  c.train.batch_size, c.train.microbatches, c.model.moe.group_size = 16, 4, 128
  with pytest.raises(config_lib.ConfigError, match="microbatches=4 must divide the 2 rows"):
    config_lib.validate(c, 8)  # 2 rows per device cannot split in 4
  c.train.microbatches, c.mesh.data, c.mesh.tensor = 2, 4, 2
  c.model.num_kv_heads = 1
  with pytest.raises(config_lib.ConfigError, match="num_kv_heads=1 is not divisible by the 2"):
    config_lib.validate(c, 8)


def test_top2_dropless_sequence_is_causal_and_accepted():
  """Mixtral's routing (top-2, dropless, groups of consecutive tokens) has no capacity
  competition, so the causality guard accepts it; the capacity dispatch is refused."""
  c = load_config("configs/mixtral_8x7b.py", "tiny")
  assert (c.model.moe.top_k, c.model.moe.dispatch, c.model.moe.group_layout) == (
    2,
    "dropless",
    "sequence",
  )
  config_lib.validate(c, 1)
  c.model.moe.dispatch = "capacity"
  with pytest.raises(config_lib.ConfigError, match="leaks the future"):
    config_lib.validate(c, 1)


@pytest.mark.parametrize(
  "recipe, params, devices",
  [
    ("configs/mixtral_8x7b.py", 46_702_792_704, 16),
    ("configs/qwen3_moe_30b_a3b.py", 30_532_122_624, 8),
  ],
)
def test_large_recipes_have_the_published_sizes(recipe, params, devices):
  """Parameter counts of the published models (embeddings untied, no biases), exactly."""
  from flax import nnx

  c = load_config(recipe)
  config_lib.validate(c, devices)
  abstract = nnx.eval_shape(lambda: Transformer(c.model, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == params
  config_lib.validate(load_config(recipe, "tiny"), 1)


def test_unknown_router_lists_known_ones():
  c = config_lib.default_config()
  c.model.moe.router = "nope"
  with pytest.raises(config_lib.ConfigError, match="switch") as err:
    config_lib.validate(c, 1)
  assert "top_k" in str(err.value)


def test_config_is_locked_and_typed():
  c = config_lib.default_config()
  with pytest.raises(AttributeError, match='Did you mean "num_experts"'):
    c.model.moe.num_expert = 4  # typo of num_experts
  with pytest.raises(TypeError, match="original type"):
    c.train.steps = "100"
  with pytest.raises(TypeError, match="original type"):
    c.model.d_model = 64.5
  c.optim.learning_rate = 1  # an int where a float is expected is a float
  assert c.optim.learning_rate == 1.0 and isinstance(c.optim.learning_rate, float)
  # Optional values are typed placeholders: None derives them, never 0.
  assert c.model.head_dim is None and c.model.moe.d_expert is None
  c.model.head_dim = 32
  with pytest.raises(TypeError, match="original type"):
    c.model.head_dim = "32"


def test_router_options_are_per_family_sections():
  c = config_lib.default_config()
  assert c.model.moe.switch.jitter_eps == 0.0 and c.model.moe.deepseek.route_scale == 1.0
  c.model.moe.switch.jitter_eps = 1.5
  with pytest.raises(config_lib.ConfigError, match=r"model.moe.switch.jitter_eps=1.5: must be"):
    config_lib.validate(c, 1)


def test_mesh_errors():
  c = config_lib.default_config()
  c.mesh.expert, c.mesh.data = 3, -1
  with pytest.raises(config_lib.ConfigError, match="does not divide the 8 available"):
    config_lib.validate(c, 8)
  c.mesh.expert = 16
  c.mesh.data = 1
  with pytest.raises(config_lib.ConfigError, match="needs 16 devices but 8 are available"):
    config_lib.validate(c, 8)
  c = config_lib.default_config()
  c.model.moe.num_experts, c.mesh.expert = 6, 4
  c.mesh.data = 2
  with pytest.raises(
    config_lib.ConfigError, match="num_experts=6 is not divisible by mesh.expert=4"
  ):
    config_lib.validate(c, 8)
  c = config_lib.default_config()
  c.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="batch_size=12 is not divisible by the 8"):
    config_lib.validate(c, 8)


def test_mesh_fill_axis():
  c = config_lib.default_config()
  c.mesh.expert = 4
  assert config_lib.validate(c, 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


def test_memory_estimate_counts_sharded_params():
  from flax import nnx

  from moejax import mesh as mesh_lib
  from moejax import sharding

  c = load_config("configs/switch_base.py", "tiny")
  c.mesh.data, c.mesh.expert = 2, 4
  shape = config_lib.validate(c, 8)
  mesh = mesh_lib.make_mesh(shape)
  model = nnx.eval_shape(lambda: Transformer(c.model, rngs=nnx.Rngs(0)))
  _, params = nnx.split(model, nnx.Param)
  rules = config_lib.rules_from_config(c.mesh)
  shards = sharding.state_shardings(params, mesh, rules)
  params, shards = nnx.to_pure_dict(params), nnx.to_pure_dict(shards)
  abstract = jax.tree.map(
    lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shards
  )
  est = memory.estimate_memory_bytes(abstract, c, shape, rules)
  total = sum(p.size * 4 for p in jax.tree.leaves(params))
  expert = sum(p.size * 4 for p in jax.tree.leaves(params) if p.ndim == 3 and p.shape[0] == 8)
  # Expert weights are split 4 ways; the rest is replicated.
  assert est["params"] == pytest.approx(total - expert + expert / 4)
  assert est["optimizer"] == pytest.approx(2 * est["params"])


def test_full_switch_base_stops_at_memory_preflight(tmp_path):
  """The real recipe on this machine ends in the pre-flight message, not an OOM kill."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      "configs/switch_base.py",
      "--workdir",
      str(tmp_path / "run"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "memory pre-flight" in proc.stderr
  assert "switch_base.py:tiny" in proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_help_and_bad_override(tmp_path):
  helped = subprocess.run(
    [sys.executable, "-m", "moejax.train", "--help"], cwd=ROOT, capture_output=True, text=True
  )
  assert helped.returncode == 0 and "--workdir" in helped.stdout
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      "configs/switch_base.py:tiny",
      "--workdir",
      str(tmp_path),
      "--config.model.moe.router=nope",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("moejax: error: model.moe.router='nope' is not one of: ")
  assert "switch" in last and "top_k" in last


@pytest.mark.parametrize(
  "override, expected",
  [
    ("--config.model.moe.num_expert=4", 'Did you mean "num_experts"'),
    ("--config.train.steps=abc", "--config.train.steps=abc"),
    ("--config.model.moe.switch.jitter_eps=x", "jitter_eps"),
  ],
)
def test_cli_misspelt_or_mistyped_overrides_are_one_line(tmp_path, override, expected):
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.train",
      "--config",
      "configs/switch_base.py:tiny",
      "--workdir",
      str(tmp_path),
      override,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2, bad.stderr[-2000:]
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("moejax: error: command line: "), lines
  assert expected in lines[0]
