"""The model options the Hugging Face families need, each usable (and checked) on its own:
model.qk_norm_scope, model.qkv_bias, model.moe.shared_expert_gate, model.attention='mla' with
model.mla.*, model.first_dense_layers, the deepseek router's normalize_weights. (Their exact
equivalence with the reference models is tested on the fixtures: tests/test_hf_convert.py.)"""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib
from moejax.model.layers import DenseMLP, RMSNorm, SigmoidGated
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config


def test_all_heads_rms_norm_normalises_over_every_head_at_once():
  norm = RMSNorm((3, 4), eps=1e-5, axes=("heads", "kv"))
  scale = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  norm.scale[...] = scale
  x = np.random.default_rng(1).normal(size=(2, 5, 3, 4)).astype(np.float32)
  flat = x.reshape(2, 5, 12)
  expected = flat / np.sqrt(np.mean(flat**2, -1, keepdims=True) + 1e-5) * scale.reshape(12)
  np.testing.assert_allclose(np.asarray(norm(x)), expected.reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_sigmoid_gate_scales_each_token():
  rngs = nnx.Rngs(0)
  mlp = DenseMLP(8, 16, activation="swiglu", init_std=0.5, out_std=0.5, rngs=rngs)
  gated = SigmoidGated(mlp, 8)
  w = np.random.default_rng(0).normal(size=8).astype(np.float32)
  gated.gate[...] = w
  x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32)
  expected = np.asarray(mlp(x)) / (1 + np.exp(-(x @ w)))[..., None]
  np.testing.assert_allclose(np.asarray(gated(x)), expected, rtol=1e-5, atol=1e-6)


def test_options_build_their_parameters():
  cfg = tiny_config("unused")
  m = cfg.model
  m.qk_norm, m.qk_norm_scope, m.qkv_bias = True, "all_heads", True
  m.moe.num_shared_experts, m.moe.shared_expert_gate = 1, True
  config_lib.validate(cfg, 1)
  model = Transformer(m, rngs=nnx.Rngs(0))
  attn, ffn = model.blocks[1].attention, model.blocks[1].ffn
  heads, head_dim = m.num_heads, m.d_model // m.num_heads
  assert attn.q_norm.scale.shape == (heads, head_dim) and attn.bq.shape == (heads, head_dim)
  assert isinstance(ffn.shared_experts, SigmoidGated)
  logits, _ = model(jax.numpy.zeros((2, 32), jax.numpy.int32), train=False)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("qk_norm_scope", "per_token", "model.qk_norm_scope='per_token' is not one of"),
    ("shared_expert_gate", True, "shared_expert_gate=True needs model.moe.num_shared_experts"),
    ("attention", "gqa", "model.attention='gqa' is not one of: mha, mla"),
    ("mla.qk_rope_head_dim", 5, "qk_rope_head_dim=5 even"),
    ("mla.v_head_dim", 0, "model.mla.v_head_dim=0: must be positive"),
    ("first_dense_layers", -1, "model.first_dense_layers=-1: must be >= 0"),
  ],
)
def test_bad_option_values_are_refused(key, value, message):
  cfg = tiny_config("unused")
  section = cfg.model.moe if key == "shared_expert_gate" else cfg.model
  if key.startswith("mla."):
    cfg.model.attention, section, key = "mla", cfg.model.mla, key[4:]
  section[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg, 1)


def test_first_dense_layers_are_dense_and_refuse_scanning():
  cfg = tiny_config("unused")
  cfg.model.num_layers, cfg.model.moe_every, cfg.model.first_dense_layers = 4, 1, 2
  config_lib.validate(cfg, 1)
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  assert [hasattr(b.ffn, "router") for b in model.blocks] == [False, False, True, True]
  cfg.model.scan_layers = True
  with pytest.raises(config_lib.ConfigError, match="first_dense_layers"):
    config_lib.validate(cfg, 1)


def test_deepseek_weights_without_normalisation_are_scaled_affinities():
  from moejax.model.routers import deepseek

  logits = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
  bias = np.random.default_rng(1).normal(scale=0.3, size=8).astype(np.float32)
  routing = deepseek.route_deepseek(logits, bias, top_k=3, route_scale=2.5, normalize_weights=False)
  experts = np.asarray(routing.expert_index).reshape(3, 6).T
  chosen = np.argsort(-(1 / (1 + np.exp(-logits)) + bias), axis=-1)[:, :3]  # brute force
  np.testing.assert_array_equal(np.sort(experts, -1), np.sort(chosen, -1))
  expected = 2.5 / (1 + np.exp(-np.take_along_axis(logits, experts, -1)))
  np.testing.assert_allclose(np.asarray(routing.combine_weight).reshape(3, 6).T, expected, 1e-6)
