r"""Sample text from a trained run with a key/value cache, jitted, on any mesh.

  python -m moejax.generate --workdir DIR --prompt "To be, or not" [--max_new_tokens 64]
      [--temperature 0.8] [--top_k 40] [--top_p 0.95] [--seed 0] [--num_samples 1] [--step N]
      [--mesh data=8]

The prompt is encoded with the run's tokenizer, run through the model once (prefill), then one
token per step is sampled and fed back through the cache (moejax/decode.py), all inside one
`jax.jit` (a `fori_loop` over the new tokens). Sampling: temperature 0 = greedy; otherwise
logits / temperature, restricted to the `top_k` most likely tokens (0 = all) and to the
smallest set whose probability reaches `top_p` (1.0 = all), then a categorical draw.

Rows: the batch holds `num_samples` rows rounded up to a multiple of the batch shards of the
mesh and, with group_layout 'position', of model.moe.group_size (a routing group is one position
of group_size sequences). Extra rows are further samples of the same prompt, not printed.
Generation stops after `max_new_tokens`; text after an end-of-sequence token is cut.
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moejax import cli, config_lib, decode, errors, restore, sharding
from moejax.data import pipeline, tokenizer_files


def filter_logits(logits_bv, *, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top-k / top-p (nucleus) set to -inf.

  Args:
    logits_bv: float32 [B, V].
    top_k: keep the k largest logits per row (0 = keep all).
    top_p: keep the smallest set of most likely tokens whose probability sum reaches top_p
      (the most likely token is always kept; 1.0 = keep all).
  """
  neg_inf = jnp.asarray(-jnp.inf, logits_bv.dtype)
  if top_k > 0:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, neg_inf, logits_bv)
  if top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    # Token j (in descending order) is kept when the tokens before it sum to < top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold, neg_inf, logits_bv)
  return logits_bv


def sample(logits_bv, key, *, temperature: float, top_k: int, top_p: float):
  """Next tokens int32 [B]: greedy when temperature == 0, else filtered categorical draws."""
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits_bv / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_generate_fn(
  graphdef,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  return_logits: bool = False,
):
  """`fn(params, model_state, prompt_bp, key) -> new tokens int32 [B, N] (, logits [B, N, V])`.

  Pure; wrap in jax.jit. logits[:, i] are the logits the i-th new token was sampled from.
  """
  sample_fn = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

  def fn(params, model_state, prompt_bp, key):
    model = nnx.merge(graphdef, params, model_state)
    decode.prepare_for_decoding(model)
    batch, prompt_len = prompt_bp.shape
    cache = decode.init_cache(model, batch, prompt_len + max_new_tokens)
    logits, cache = decode.forward_with_cache(model, prompt_bp, cache, 0)
    vocab = logits.shape[-1]
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)
    all_logits = jnp.zeros((batch, max_new_tokens, vocab) if return_logits else (0,), jnp.float32)

    def step(i, carry):
      cache, last_bv, tokens, all_logits = carry
      new_b = sample_fn(last_bv, jax.random.fold_in(key, i))
      tokens = tokens.at[:, i].set(new_b)
      if return_logits:
        all_logits = all_logits.at[:, i].set(last_bv)
      logits, cache = decode.forward_with_cache(model, new_b[:, None], cache, prompt_len + i)
      return cache, logits[:, 0], tokens, all_logits

    carry = (cache, logits[:, -1], tokens, all_logits)
    _, _, tokens, all_logits = jax.lax.fori_loop(0, max_new_tokens, step, carry)
    return (tokens, all_logits) if return_logits else tokens

  return fn


def num_rows(cfg, mesh, num_samples: int) -> int:
  """Batch rows: num_samples rounded up to a multiple of the batch shards (and group_size)."""
  rules = config_lib.rules_from_config(cfg.mesh)
  unit = sharding.axes_size(mesh, rules["batch"])
  if cfg.model.moe_every and cfg.model.moe.group_layout == "position":
    unit = math.lcm(unit, cfg.model.moe.group_size)
  return unit * math.ceil(num_samples / unit)


def generate(
  model: restore.RestoredModel,
  prompt_bp: np.ndarray,
  *,
  max_new_tokens: int,
  seed: int = 0,
  return_logits: bool = False,
  **sampling,
):
  """Runs the jitted sampler on the model's mesh; returns host arrays (see make_generate_fn).

  The rules are part of the model's graph definition and the mesh is JAX's context, so the
  cached sampler retraces for another mesh or rules by itself.
  """
  prompt = jax.device_put(
    np.asarray(prompt_bp, np.int32),
    NamedSharding(model.mesh, model.rules.spec(("batch", "length"))),
  )
  settings = dict(max_new_tokens=max_new_tokens, return_logits=return_logits, **sampling)
  fn = _jitted(model.graphdef, tuple(sorted(settings.items())))
  with jax.set_mesh(model.mesh):
    out = fn(model.params, model.model_state, prompt, jax.random.key(seed))
  return jax.device_get(out)


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, settings):
  """One jitted sampler per (model, settings): repeated calls skip building it again."""
  return jax.jit(make_generate_fn(graphdef, **dict(settings)))


def main(argv=None) -> list[str]:
  parser = argparse.ArgumentParser(
    prog="python -m moejax.generate", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--workdir", required=True, help="the run directory of moejax.train")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
  parser.add_argument("--top_p", type=float, default=1.0, help="1.0 = no nucleus filter")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=int, default=1)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--mesh", default="", help="e.g. data=8 (default: the run's)")
  args = parser.parse_args(argv)
  for name, ok, fix in [
    ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
    ("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
    ("top_k", args.top_k >= 0, ">= 0 (0 = off)"),
    ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
    ("num_samples", args.num_samples >= 1, ">= 1"),
  ]:
    if not ok:
      raise errors.ConfigError(f"--{name}={getattr(args, name)}: must be {fix}")
  cfg = restore.load_run_config(args.workdir)
  mesh, rules = restore.make_inference_mesh(cfg, mesh_overrides=restore.parse_mesh(args.mesh))
  tokenizer = tokenizer_files.imported_tokenizer(args.workdir) or pipeline.run_tokenizer(
    cfg.data, args.workdir
  )
  ids = tokenizer.encode(args.prompt)
  if not ids:
    raise errors.ConfigError("--prompt encodes to no token; give some text")
  model = restore.restore_model(args.workdir, cfg, mesh, rules, step=args.step)
  rows = num_rows(cfg, mesh, args.num_samples)
  prompt = np.tile(np.asarray(ids, np.int32)[None], (rows, 1))
  tokens = generate(
    model,
    prompt,
    max_new_tokens=args.max_new_tokens,
    seed=args.seed,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
  )
  texts = []
  for row in tokens:
    row = list(row)
    if tokenizer.eos_id in row:
      row = row[: row.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(ids + row))
  texts = texts[: args.num_samples]  # the other rows only fill the mesh / routing groups
  for i, text in enumerate(texts):
    print(f"--- sample {i} (step {model.step})\n{text}")
  return texts


if __name__ == "__main__":
  cli.run(main)
