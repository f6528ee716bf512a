"""KV-cache decoding equals recomputing the sequence for the router families added on the router
seam (where the family decodes), on the {data 2, expert 4} mesh; SMEAR refuses to decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import decode, generate, restore
from moejax.model.transformer import Transformer
from tests.family_configs import family_config

# (router, family options, group layout, group_size): per-token routers in the 'sequence'
# layout (decoded one token per group), PEER and batch-prioritized Switch in 'position'.
CASES = [
  ("hash", {}, "sequence", 8),
  ("top_p", {}, "sequence", 8),
  ("relu", {}, "sequence", 8),
  ("random", {"eval_choice": "random"}, "sequence", 8),
  ("random", {"eval_choice": "ensemble"}, "sequence", 8),
  ("autonomy", {}, "sequence", 8),
  ("peer", {}, "position", 4),
  ("switch", {"batch_prioritized": True}, "position", 4),
]


def _model(router, options, layout, group_size):
  cfg = family_config(router, data=2, expert=4)
  moe = cfg.model.moe
  moe.group_layout, moe.group_size = layout, group_size
  for key, value in options.items():
    moe[router][key] = value
  if "init_std" in moe[router]:
    moe[router].init_std = 0.3  # decisive routing
  # Room for every pair in the full forward pass too (decoding never drops).
  moe.eval_capacity_factor = float(moe.num_experts)
  mesh, rules = restore.make_inference_mesh(cfg)
  model = Transformer(cfg.model, rngs=nnx.Rngs(3), rules=rules)
  if router == "peer":  # non-trivial running statistics of the query batch norm
    stats = model.blocks[1].ffn.router
    stats.running_mean[...] = 0.1 * jnp.ones_like(stats.running_mean[...])
    stats.running_var[...] = 2.0 * jnp.ones_like(stats.running_var[...])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return restore.RestoredModel(
    graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), 0, cfg, mesh, rules
  )


@pytest.mark.parametrize(
  "router, options, layout, group_size",
  CASES,
  ids=[f"{c[0]}-{'-'.join(map(str, c[1].values())) or c[2]}" for c in CASES],
)
def test_cached_decoding_equals_full_recompute(router, options, layout, group_size):
  model = _model(router, options, layout, group_size)
  batch, prompt_len, new = 8, 5, 7
  prompt = np.random.default_rng(0).integers(0, 512, (batch, prompt_len), dtype=np.int32)
  tokens, logits = generate.generate(
    model, prompt, max_new_tokens=new, return_logits=True, temperature=0.0
  )
  full_seq = np.concatenate([prompt, tokens], axis=1)
  with jax.set_mesh(model.mesh):

    @jax.jit
    def full(params, rest, seq):
      out, aux = nnx.merge(model.graphdef, params, rest)(seq, train=False)
      return out, aux["metrics"].get("layer_1/dropped_fraction", jnp.zeros(()))

    ref, dropped = full(model.params, model.model_state, jnp.asarray(full_seq))
  assert float(dropped) == 0.0
  ref = np.asarray(ref)[:, prompt_len - 1 : prompt_len - 1 + new]
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(tokens, ref.argmax(-1))
  assert len(np.unique(tokens)) > 1


def test_smear_refuses_to_decode():
  cfg = family_config("smear")
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="running mean over each sequence"):
    decode.prepare_for_decoding(model)
