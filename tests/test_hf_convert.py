"""Hugging Face import / export against reference fixtures written by `transformers`.

The fixtures (tests/fixtures/hf/<family>/) hold a tiny random-weight model saved by
`transformers` and its reference outputs (tests/fixtures/make_hf_fixtures.py, run where torch
is installed); this suite needs neither torch nor transformers. Per family:
- logits of an imported model equal the reference at every position of a batch (float32, 1e-4);
- greedy generation of 16 tokens (KV cache) gives the reference's tokens;
- every MoE router, run on the reference router's own inputs, picks the same experts with the same
  weights (1e-6): in the same order for the softmax routers; as the same set for DeepSeek-V3,
  whose reference returns its top-k unsorted;
- import -> export gives every tensor bit-identical (float32, and bfloat16 for Mixtral);
- an unsupported config field, model type or extra tensor is refused in one line with nothing
  written.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moejax import errors, generate, restore
from moejax.data import tokenizer_files
from moejax.hf import convert, safetensors_io
from moejax.hf.families import base

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
# Fixture directories; deepseek_v3_variant: norm_topk_prob False, full-rank q, half-split RoPE.
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v3_variant"]


def _reference(family):
  return np.load(os.path.join(FIXTURES, family, "reference.npz"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> (restored model, its merged module) of the imported fixture, on one device."""
  cache = {}

  def get(family):
    if family not in cache:
      workdir = str(tmp_path_factory.mktemp(family) / "run")
      convert.import_model(os.path.join(FIXTURES, family), workdir)
      cfg = restore.load_run_config(workdir)
      cfg.model.moe.group_size = 2  # routing is per token; any group size gives the same outputs
      mesh, rules = restore.make_inference_mesh(cfg, jax.devices()[:1], {"data": 1})
      model = restore.restore_model(workdir, cfg, mesh, rules)
      cache[family] = (workdir, model, nnx.merge(model.graphdef, model.params, model.model_state))
    return cache[family]

  return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_reference(family, imported):
  _, restored, module = imported(family)
  ref = _reference(family)
  with jax.set_mesh(restored.mesh):
    logits, _ = module(jnp.asarray(ref["input_ids"]), train=False)
  diff = np.max(np.abs(np.asarray(logits) - ref["logits"]))
  assert diff < 1e-4, diff
  assert np.std(ref["logits"]) > 0.5  # the reference is not a near-constant function


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_reference(family, imported):
  _, restored, _ = imported(family)
  ref = _reference(family)
  tokens = generate.generate(
    restored, ref["greedy_prompt"], max_new_tokens=16, seed=0, temperature=0.0, top_k=0, top_p=1.0
  )
  np.testing.assert_array_equal(np.asarray(tokens), ref["greedy_tokens"])
  assert len(set(ref["greedy_tokens"][0].tolist())) > 3  # not one token repeated


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_choose_reference_experts_and_weights(family, imported):
  _, restored, module = imported(family)
  ref = _reference(family)
  moe_blocks = [b for b in module.blocks if hasattr(b.ffn, "router")]
  assert moe_blocks and len(moe_blocks) == sum(k.startswith("router_x_") for k in ref.files)
  for i, block in enumerate(moe_blocks):
    x = jnp.asarray(ref[f"router_x_{i}"])[None]  # one group of every token
    routing = block.ffn.router(x, train=False)
    k = ref[f"router_experts_{i}"].shape[1]
    experts = np.asarray(routing.expert_index[0]).reshape(k, -1).T  # rank-major pairs
    weights = np.asarray(routing.combine_weight[0]).reshape(k, -1).T
    ref_experts, ref_weights = ref[f"router_experts_{i}"], ref[f"router_weights_{i}"]
    if family.startswith("deepseek"):  # torch.topk(sorted=False): compare by expert id
      order, ref_order = np.argsort(experts, -1), np.argsort(ref_experts, -1)
      experts, weights = (np.take_along_axis(a, order, -1) for a in (experts, weights))
      ref_experts, ref_weights = (
        np.take_along_axis(a, ref_order, -1) for a in (ref_experts, ref_weights)
      )
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6, rtol=0)
    assert len(np.unique(experts[:, 0])) > 1  # the tokens do not all pick one expert


def _assert_bit_identical(source, exported):
  a, b = safetensors_io.Reader(source), safetensors_io.Reader(exported)
  assert a.names() == b.names()
  for name in a.names():
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_is_bit_identical(family, imported, tmp_path):
  workdir, _, _ = imported(family)
  out = str(tmp_path / "exported")
  convert.export_run(workdir, out)
  _assert_bit_identical(os.path.join(FIXTURES, family), out)
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  with open(os.path.join(FIXTURES, family, "config.json")) as f:
    original = json.load(f)
  for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
    assert exported[key] == original[key]


def test_bfloat16_round_trip_and_sharded_index(tmp_path):
  """A bfloat16 model in several shards (with an index) imports and exports bit-identical."""
  source = safetensors_io.Reader(os.path.join(FIXTURES, "mixtral"))
  model_dir = tmp_path / "bf16"
  model_dir.mkdir()
  tensors = ((n, source.get(n).astype(ml_dtypes.bfloat16)) for n in source.names())
  files = safetensors_io.write_sharded(str(model_dir), tensors, max_shard_bytes=20_000)
  assert len(files) > 2 and (model_dir / safetensors_io.INDEX_FILE).exists()
  with open(os.path.join(FIXTURES, "mixtral", "config.json")) as f:
    hf = json.load(f)
  (model_dir / "config.json").write_text(json.dumps({**hf, "dtype": "bfloat16"}))
  cfg = convert.import_model(str(model_dir), str(tmp_path / "run"))
  assert cfg.model.param_dtype == "bfloat16"
  convert.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
  _assert_bit_identical(str(model_dir), str(tmp_path / "out"))


def _copy_fixture(tmp_path, family="mixtral", **config_changes):
  model_dir = tmp_path / "model"
  shutil.copytree(os.path.join(FIXTURES, family), model_dir)
  with open(model_dir / "config.json") as f:
    hf = json.load(f)
  hf.update(config_changes)
  (model_dir / "config.json").write_text(json.dumps(hf))
  return model_dir


@pytest.mark.parametrize(
  "change,named",
  [
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_field": 3}, "some_new_field"),
    ({"model_type": "llama4_text"}, "llama4_text"),
  ],
)
def test_unsupported_config_is_refused_with_nothing_written(tmp_path, change, named):
  model_dir = _copy_fixture(tmp_path, **change)
  workdir = tmp_path / "run"
  with pytest.raises(base.UnsupportedError) as info:
    convert.import_model(str(model_dir), str(workdir))
  assert named in str(info.value) and "\n" not in str(info.value)
  assert not workdir.exists()


def test_unknown_tensor_and_wrong_shape_are_refused(tmp_path):
  model_dir = _copy_fixture(tmp_path)
  reader = safetensors_io.Reader(str(model_dir))
  tensors = {n: reader.get(n) for n in reader.names()}
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  tensors["model.norm.weight"] = np.ones(31, np.float32)
  safetensors_io.write_file(str(model_dir / "model.safetensors"), sorted(tensors.items()))
  with pytest.raises(
    base.UnsupportedError, match="model.norm.weight has shape.*q_proj.bias is not used"
  ):
    convert.import_model(str(model_dir), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_existing_workdir_and_missing_files_are_user_errors(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "keep.txt").write_text("x")
  with pytest.raises(errors.ConfigError, match="not empty"):
    convert.import_model(os.path.join(FIXTURES, "mixtral"), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == ["keep.txt"]
  with pytest.raises(errors.ConfigError, match="config.json"):
    convert.import_model(str(tmp_path / "nowhere"), str(tmp_path / "run2"))
  with pytest.raises(errors.ConfigError, match="config.json"):
    convert.export_run(str(tmp_path / "run"), str(tmp_path / "out"))


def test_command_line_import_export_and_refusal(tmp_path, capsys):
  from moejax import cli
  from moejax.hf.__main__ import main

  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  cli.run(main, ["import", "--model", os.path.join(FIXTURES, "olmoe"), "--workdir", run])
  cli.run(main, ["export", "--workdir", run, "--out", out])
  assert "exported" in capsys.readouterr().out
  _assert_bit_identical(os.path.join(FIXTURES, "olmoe"), out)
  bad = _copy_fixture(tmp_path, "olmoe", clip_qkv=8.0)
  with pytest.raises(SystemExit) as info:
    cli.run(main, ["import", "--model", str(bad), "--workdir", str(tmp_path / "run2")])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("moejax: error: olmoe: config field clip_qkv=8.0") and "\n" not in err
  assert not (tmp_path / "run2").exists()


def test_deepseek_bias_changes_choices_and_scanned_mla_decodes_the_same(imported):
  """The imported correction bias matters (choices differ without it), and the MLA model run as
  an nnx.scan over layers (restored into the scanned layout) gives the same logits and tokens."""
  from moejax.model.routers import base as router_base
  from moejax.model.routers import deepseek

  workdir, restored, module = imported("deepseek_v3")
  ref = _reference("deepseek_v3")
  router = module.blocks[1].ffn.router
  logits = router_base.router_logits(jnp.asarray(ref["router_x_0"])[None], router.kernel[...])[0]
  o = router.options
  choose = lambda bias: np.sort(
    np.asarray(
      deepseek.route_deepseek(
        logits,
        bias,
        top_k=router.top_k,
        route_scale=o.route_scale,
        num_expert_groups=o.num_expert_groups,
        top_expert_groups=o.top_expert_groups,
      ).expert_index
    ).reshape(router.top_k, -1),
    axis=0,
  )
  assert np.abs(np.asarray(router.bias[...])).max() > 0
  assert (choose(router.bias[...]) != choose(jnp.zeros_like(router.bias[...]))).any()

  workdir, restored, _ = imported("deepseek_v3_variant")
  ref = _reference("deepseek_v3_variant")
  cfg = restored.cfg.copy_and_resolve_references()
  cfg.model.scan_layers = True
  scanned = restore.restore_model(workdir, cfg, restored.mesh, restored.rules)
  with jax.set_mesh(scanned.mesh):
    merged = nnx.merge(scanned.graphdef, scanned.params, scanned.model_state)
    assert merged.scanned
    logits, _ = merged(jnp.asarray(ref["input_ids"]), train=False)
  assert np.max(np.abs(np.asarray(logits) - ref["logits"])) < 1e-4
  tokens = generate.generate(
    scanned, ref["greedy_prompt"], max_new_tokens=16, seed=0, temperature=0.0, top_k=0, top_p=1.0
  )
  np.testing.assert_array_equal(np.asarray(tokens), ref["greedy_tokens"])


def test_deepseek_multi_token_prediction_layer_is_skipped(tmp_path):
  """DeepSeek-V3 stores its MTP module as layer num_hidden_layers; transformers ignores it, so
  does the import (num_nextn_predict_layers=1), while an unknown layer is still refused."""
  model_dir = _copy_fixture(tmp_path, "deepseek_v3")
  reader = safetensors_io.Reader(str(model_dir))
  tensors = {n: reader.get(n) for n in reader.names()}
  tensors["model.layers.3.eh_proj.weight"] = np.zeros((32, 64), np.float32)
  safetensors_io.write_file(str(model_dir / "model.safetensors"), sorted(tensors.items()))
  convert.import_model(str(model_dir), str(tmp_path / "run"))
  tensors["model.layers.4.eh_proj.weight"] = np.zeros((32, 64), np.float32)
  safetensors_io.write_file(str(model_dir / "model.safetensors"), sorted(tensors.items()))
  with pytest.raises(base.UnsupportedError, match="model.layers.4.eh_proj.weight is not used"):
    convert.import_model(str(model_dir), str(tmp_path / "run2"))


def test_generate_command_uses_the_imported_tokenizer(tmp_path, capsys):
  """`moejax.generate` on an imported run encodes and decodes with the model's tokenizer.json:
  the printed text is the prompt and the greedy tokens of the KV-cache sampler, as words."""
  from moejax import generate as generate_lib
  from tests import prepared_corpus

  model_dir = _copy_fixture(tmp_path, "mixtral")
  prepared_corpus.number_tokenizer(model_dir / "tokenizer.json", 94)  # ids 0..93, </s> = 94
  (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  run = str(tmp_path / "run")
  convert.import_model(str(model_dir), run)
  texts = generate_lib.main(
    ["--workdir", run, "--prompt", "5 17 33", "--temperature", "0", "--max_new_tokens", "6"]
  )
  cfg = restore.load_run_config(run)
  mesh, rules = restore.make_inference_mesh(cfg)
  model = restore.restore_model(run, cfg, mesh, rules)
  prompt = np.tile(np.asarray([[5, 17, 33]], np.int32), (generate_lib.num_rows(cfg, mesh, 1), 1))
  ids = np.asarray(
    generate.generate(model, prompt, max_new_tokens=6, seed=0, temperature=0.0, top_k=0, top_p=1.0)
  )[0].tolist()
  ids = ids[: ids.index(94)] if 94 in ids else ids  # the text ends at eos (</s>)
  tokenizer = tokenizer_files.imported_tokenizer(run)
  assert tokenizer.encode("5 17 33") == [5, 17, 33] and ids
  assert texts[0] == tokenizer.decode([5, 17, 33] + ids)
  assert texts[0] in capsys.readouterr().out
