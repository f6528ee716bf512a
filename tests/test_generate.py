"""KV-cache decoding equals recomputing the full sequence; sampling filters; the CLI's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, generate, restore
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config

# (router, group layout, group_size): a per-token router in the sequence layout, and routers
# that mix the tokens of a group (only causal, hence only decodable, in the position layout).
ROUTERS = [
  ("switch", "sequence", 8),
  ("expert_choice", "position", 4),
  ("base", "position", 4),
]


def _model(router, layout, group_size):
  cfg = tiny_config("unused", data=2, expert=4)
  moe = cfg.model.moe
  moe.router, moe.group_layout, moe.group_size = router, layout, group_size
  # Capacity for every token in the full forward pass, so that nothing is dropped there
  # either (generation routes one token per group in the sequence layout and never drops).
  moe.eval_capacity_factor = float(moe.num_experts)
  mesh, rules = restore.make_inference_mesh(cfg)
  model = Transformer(cfg.model, rngs=nnx.Rngs(3), rules=rules)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return restore.RestoredModel(
    graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), 0, cfg, mesh, rules
  )


@pytest.mark.parametrize("router,layout,group_size", ROUTERS)
def test_cached_decoding_equals_full_recompute(router, layout, group_size):
  model = _model(router, layout, group_size)
  batch, prompt_len, new = 8, 5, 7
  prompt = np.random.default_rng(0).integers(0, 512, (batch, prompt_len), dtype=np.int32)
  tokens, logits = generate.generate(
    model, prompt, max_new_tokens=new, return_logits=True, temperature=0.0
  )
  assert tokens.shape == (batch, new) and logits.shape == (batch, new, 512)

  # Reference: the whole sequence (prompt + generated) through the ordinary forward pass.
  full_seq = np.concatenate([prompt, tokens], axis=1)
  with jax.set_mesh(model.mesh):

    @jax.jit
    def full(params, rest, seq):
      out, aux = nnx.merge(model.graphdef, params, rest)(seq, train=False)
      return out, aux["metrics"]["layer_1/dropped_fraction"]

    ref, dropped = full(model.params, model.model_state, jnp.asarray(full_seq))
  assert float(dropped) == 0.0
  ref = np.asarray(ref)[:, prompt_len - 1 : prompt_len - 1 + new]
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(tokens, ref.argmax(-1))  # greedy = argmax of the recompute
  assert len(np.unique(tokens)) > 1  # not a degenerate constant output


def _numpy_filter(logits, top_k, top_p):
  """Reference: per row, the kept token set by sorting in plain python."""
  kept = []
  for row in logits:
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k:
      order = order[:top_k]
    probs = np.exp(row[order] - row[order].max())
    probs /= probs.sum()
    keep, total = [], 0.0
    for i, p in zip(order, probs, strict=True):
      if total >= top_p:
        break
      keep.append(i)
      total += p
    kept.append(set(keep))
  return kept


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8)])
def test_filter_logits_matches_reference(top_k, top_p):
  logits = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32) * 2
  out = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  got = [set(np.flatnonzero(np.isfinite(row))) for row in out]
  assert got == _numpy_filter(logits, top_k, top_p)
  kept = np.isfinite(out)
  np.testing.assert_array_equal(out[kept], logits[kept])  # kept logits are unchanged


def test_sampling_stays_in_filtered_set_and_is_seeded():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 50)).astype(np.float32))
  allowed = _numpy_filter(np.asarray(logits), 5, 0.7)
  draw_fn = jax.jit(
    jax.vmap(lambda key: generate.sample(logits, key, temperature=0.7, top_k=5, top_p=0.7))
  )
  draws = np.asarray(draw_fn(jax.random.split(jax.random.key(0), 40)))
  for draw in draws:
    assert all(int(t) in allowed[r] for r, t in enumerate(draw))
  assert len({tuple(d) for d in draws}) > 1  # the draws do vary with the key
  first_key = jax.random.split(jax.random.key(0), 40)[0]
  again = generate.sample(logits, first_key, temperature=0.7, top_k=5, top_p=0.7)
  np.testing.assert_array_equal(np.asarray(again), draws[0])
  greedy = generate.sample(logits, jax.random.key(0), temperature=0.0, top_k=0, top_p=1.0)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(logits).argmax(-1))


def test_generation_rows_fill_mesh_and_groups():
  model = _model("expert_choice", "position", 4)
  assert generate.num_rows(model.cfg, model.mesh, 1) == 8  # 8 batch shards
  model.cfg.model.moe.group_size = 16
  assert generate.num_rows(model.cfg, model.mesh, 20) == 32  # lcm(8, 16) = 16 -> 2 x 16


def test_cli_rejects_bad_sampling_options(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="--top_p=1.5: must be in"):
    generate.main(["--workdir", str(tmp_path), "--prompt", "x", "--top_p", "1.5"])


def test_base_router_in_sequence_layout_is_refused_for_decoding():
  from moejax import decode

  cfg = tiny_config("unused")
  cfg.model.moe.router, cfg.model.moe.allow_noncausal = "base", True
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="router 'base' needs model.moe.group_layout='position'"):
    decode.prepare_for_decoding(model)
