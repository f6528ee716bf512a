"""Hugging Face model directory <-> moejax run directory, tensor by tensor.

Import: config.json -> the family's moejax config (refusing what moejax does not compute),
every tensor checked (names, shapes, nothing left over) before anything is written, then each
moejax parameter assembled on the host from its HF tensors (read one at a time from memory-mapped
files), placed on the mesh, and saved as step 0 of a fresh train state (AdamW moments at zero)
with the run's config.json. The HF config and the tokenizer files are kept in RUN/hf/ so that
export writes them back unchanged.

Export: the run's parameters restored (per-layer layout) and written as the HF tensors, in
shards, with config.json: the kept HF config with the fields moejax models rewritten.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from moejax import checkpoint, config_lib, errors, optim, restore, sharding, train_step, training
from moejax.hf import families, safetensors_io
from moejax.hf.families import base

HF_DIR = "hf"  # RUN/hf/: the imported config.json and tokenizer files
# Files copied as they are between a model directory and RUN/hf/.
PASSTHROUGH = (
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "chat_template.jinja",
)
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
MAX_SHARD_BYTES = 5 * 2**30
DTYPES_FILE = "tensor_dtypes.json"  # RUN/hf/: each HF tensor's stored dtype, which export keeps


def read_hf_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise errors.ConfigError(
      f"--model {model_dir!r}: cannot read config.json ({e.strerror or e}); give a Hugging Face "
      "model directory"
    ) from None
  except ValueError as e:
    raise errors.ConfigError(f"{path} is not JSON ({e})") from None


def moejax_config(hf: dict):
  """(moejax config, family module) of an HF config; UnsupportedError names what is not."""
  family = families.get(hf.get("model_type", ""))
  cfg = config_lib.default_config()
  fields = base.Fields(hf, family.MODEL_TYPE)
  family.configure(cfg, fields)
  fields.refuse_unknown()
  return cfg, family


def check_tensors(reader: safetensors_io.Reader, tensors: list[base.Tensor], skip=()) -> None:
  """Every HF tensor the family needs exists with its shape, and none is left unused (except
  names starting with one of `skip`, which the family declares unused)."""
  problems, used, stored = [], set(), set(reader.names())
  for t in tensors:
    for name in t.hf:
      used.add(name)
      if name not in stored:
        problems.append(f"{name} is missing")
      elif reader.shape(name) != t.hf_shape:
        problems.append(f"{name} has shape {list(reader.shape(name))}, expected {list(t.hf_shape)}")
  extra = [
    n for n in sorted(stored - used) if not n.endswith(IGNORED_TENSORS) and not n.startswith(skip)
  ]
  problems += [f"{name} is not used by moejax (unsupported)" for name in extra]
  if problems:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    raise base.UnsupportedError(
      f"{reader.directory}: {len(problems)} tensor problem(s): {'; '.join(problems[:3])}{more}"
    )


def assemble(reader: safetensors_io.Reader, t: base.Tensor, shape, dtype) -> np.ndarray:
  """The moejax array of `t` (shape, dtype) from its HF tensors, one expert at a time."""
  out = np.empty(shape, dtype)
  pieces = [out] if len(t.hf) == 1 else list(out)
  for piece, name in zip(pieces, t.hf, strict=True):
    hf = reader.get(name)
    hf = hf if t.rows is None else hf[np.asarray(t.rows)]
    piece[...] = (hf.T if t.transpose else hf).reshape(piece.shape).astype(dtype)
  return out


def split(t: base.Tensor, value: np.ndarray, dtypes: dict) -> list[tuple[str, np.ndarray]]:
  """The HF tensors of moejax array `value` (the inverse of `assemble`), in `dtypes[name]`."""
  pieces = [value] if len(t.hf) == 1 else list(value)
  out = []
  for name, piece in zip(t.hf, pieces, strict=True):
    flat = piece.reshape(t.hf_shape[::-1]).T if t.transpose else piece.reshape(t.hf_shape)
    if t.rows is not None:
      flat = flat[np.argsort(np.asarray(t.rows))]
    out.append((name, np.ascontiguousarray(flat.astype(dtypes[name]))))
  return out


def _require_empty(path: str, flag: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise errors.ConfigError(f"{flag} {path!r} exists and is not empty; give a new directory")


def import_model(model_dir: str, workdir: str, mesh_overrides: dict | None = None, devices=None):
  """Writes a moejax run directory for the HF model in `model_dir`; returns its config."""
  hf = read_hf_config(model_dir)
  cfg, family = moejax_config(hf)
  reader = safetensors_io.Reader(model_dir)
  tensors = family.tensors(cfg, hf)
  check_tensors(reader, tensors, tuple(getattr(family, "unused_tensors", lambda hf: ())(hf)))
  _require_empty(workdir, "--workdir")
  mesh, rules = restore.make_inference_mesh(cfg, devices, mesh_overrides)
  mesh_shape = {a: mesh.shape[a] for a in sharding.MESH_AXES}
  program = training.build(cfg, mesh, mesh_shape, rules)
  by_path = {t.path: t for t in tensors}
  _, abs_params, abs_rest = restore.abstract_model(cfg.model, cfg.train.seed, rules)
  placed = []
  for state in (abs_params, abs_rest):
    shardings = restore.flatten(nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules)))
    leaves = {}
    for path, leaf in restore.flatten(nnx.to_pure_dict(state)).items():
      if path not in by_path:  # a family maps every parameter; a gap is a converter bug
        raise ValueError(f"{family.MODEL_TYPE}: no HF tensor maps to moejax {path}")
      host = assemble(reader, by_path.pop(path), leaf.shape, leaf.dtype)
      leaves[path] = jax.device_put(host, shardings[path])
    placed.append(_unflatten(leaves, nnx.to_pure_dict(state)))
  if by_path:
    raise ValueError(f"{family.MODEL_TYPE}: mapped tensors the model lacks: {sorted(by_path)}")
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  with jax.set_mesh(mesh):
    state = jax.jit(
      lambda p, r: train_step.new_train_state(p, r, optimizer, cfg.train.seed),
      out_shardings=program.state_shardings,
    )(*placed)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_config(workdir, cfg.to_dict())
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  ckpt.save(0, state, {"next_index": 0})  # the data iterators' state before their first batch
  ckpt.close()
  os.makedirs(os.path.join(workdir, HF_DIR), exist_ok=True)
  with open(os.path.join(workdir, HF_DIR, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  dtypes = {name: reader.dtype_name(name) for t in tensors for name in t.hf}
  with open(os.path.join(workdir, HF_DIR, DTYPES_FILE), "w") as f:
    json.dump(dtypes, f, indent=0, sort_keys=True)
  _copy_passthrough(model_dir, os.path.join(workdir, HF_DIR))
  return cfg


def export_run(workdir: str, out: str, step: int | None = None, devices=None) -> list[str]:
  """Writes the run's checkpoint (latest or `step`) as an HF model directory; returns its
  safetensors file names."""
  cfg = restore.load_run_config(workdir)
  kept = os.path.join(workdir, HF_DIR, "config.json")
  hf = read_hf_config(os.path.dirname(kept)) if os.path.exists(kept) else {}
  if not hf:
    raise errors.ConfigError(
      f"{workdir!r} has no {HF_DIR}/config.json: export needs a run made by `moejax.hf import`"
    )
  family = families.get(hf.get("model_type", ""))
  new_fields = family.hf_config(cfg)  # refuses configs the family cannot express
  _require_empty(out, "--out")
  cfg.model.scan_layers = False  # restore in the per-layer layout the tensors are named in
  devices = (jax.devices() if devices is None else list(devices))[:1]
  mesh, rules = restore.make_inference_mesh(cfg, devices, {"data": 1})
  model = restore.restore_model(workdir, cfg, mesh, rules, step=step)
  values = {
    **restore.flatten(jax.device_get(model.params)),
    **restore.flatten(jax.device_get(model.model_state)),
  }
  tensors = family.tensors(cfg, hf)
  dtypes = _export_dtypes(workdir, cfg, tensors)

  def hf_tensors():
    for t in tensors:
      yield from split(t, np.asarray(values[t.path]), dtypes)

  os.makedirs(out, exist_ok=True)
  files = safetensors_io.write_sharded(out, hf_tensors(), MAX_SHARD_BYTES)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({**hf, **new_fields}, f, indent=2, sort_keys=True)
  _copy_passthrough(os.path.join(workdir, HF_DIR), out)
  return files


def _export_dtypes(workdir: str, cfg, tensors: list[base.Tensor]) -> dict:
  """Each HF tensor's dtype: as imported, else the model's parameter dtype."""
  default = safetensors_io.DTYPES["BF16" if cfg.model.param_dtype == "bfloat16" else "F32"]
  path = os.path.join(workdir, HF_DIR, DTYPES_FILE)
  saved = {}
  if os.path.exists(path):
    with open(path) as f:
      saved = {name: safetensors_io.DTYPES[kind] for name, kind in json.load(f).items()}
  return {name: saved.get(name, default) for t in tensors for name in t.hf}


def _copy_passthrough(source: str, target: str) -> None:
  for name in PASSTHROUGH:
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


def _unflatten(leaves: dict, like: dict, prefix: str = "") -> dict:
  """{'a.b': x} back into the nesting (and key types) of `like`."""
  out = {}
  for key, value in like.items():
    name = f"{prefix}{key}"
    out[key] = _unflatten(leaves, value, name + ".") if isinstance(value, dict) else leaves[name]
  return out
