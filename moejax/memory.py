"""Memory pre-flight: bytes per device of one training step, estimated before compiling, against
what a device has; a config that does not fit stops with the numbers and the fix."""

from __future__ import annotations

import math
import os

from moejax import errors, sharding


def device_memory_bytes(device) -> tuple[int, str]:
  """Memory one device may use, and where the number came from."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without stats raise various errors
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform} bytes_limit"
  # CPU devices share the host's memory.
  import jax

  avail = _meminfo_bytes("MemAvailable")
  n = max(1, jax.local_device_count())
  return avail // n, f"host MemAvailable / {n} local devices"


def _meminfo_bytes(field: str) -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _per_device_bytes(x, mesh_shape) -> float:
  """Bytes of one device's shard of an abstract array carrying a NamedSharding."""
  shards = 1
  for part in getattr(getattr(x, "sharding", None), "spec", ()):
    for axis in (part if isinstance(part, tuple) else (part,)) if part else ():
      shards *= mesh_shape[axis]
  return x.size * x.dtype.itemsize / shards


def estimate_memory_bytes(
  state, cfg, mesh_shape: dict[str, int], rules: sharding.Rules
) -> dict[str, float]:
  """Bytes per device for one training step, before anything is compiled.

  Args:
    state: the abstract train state (or only its parameters): `jax.ShapeDtypeStruct`s carrying
      `NamedSharding`s.
    cfg: the validated config.
    mesh_shape: resolved mesh axis sizes.
    rules: the sharding rules (which mesh axes split the batch, heads, vocabulary).

  Returns:
    dict with `params`, `optimizer` (the optimizer state as stored), `gradients` (gradients,
    the float32 update and, with microbatches, the float32 accumulator), `activations`
    (`activation_bytes`) and `total`, all bytes per device.
  """
  import jax  # local: config_lib stays importable without a backend

  full = isinstance(state, dict) and "opt_state" in state and "params" in state
  params = state["params"] if full else state
  leaves = jax.tree.leaves(params)
  param_bytes = sum(_per_device_bytes(x, mesh_shape) for x in leaves)
  elements = sum(_per_device_bytes(x, mesh_shape) / x.dtype.itemsize for x in leaves)
  if full:
    opt_bytes = sum(_per_device_bytes(x, mesh_shape) for x in jax.tree.leaves(state["opt_state"]))
  else:
    moment = 2 if getattr(cfg.optim, "moment_dtype", "float32") == "bfloat16" else 4
    opt_bytes = 2 * elements * moment
  # Gradients in the parameters' dtype, their float32 copy for the update (computed in float32),
  # and the float32 accumulator of gradient accumulation.
  grad_bytes = param_bytes + (4 * elements if param_bytes < 4 * elements else 0)
  if cfg.train.microbatches > 1:
    grad_bytes += 4 * elements
  est = {
    "params": param_bytes,
    "optimizer": opt_bytes,
    "gradients": grad_bytes,
    "activations": activation_bytes(cfg, mesh_shape, rules),
  }
  est["total"] = sum(est.values())
  return est


def activation_bytes(cfg, mesh_shape: dict[str, int], rules: sharding.Rules) -> float:
  """What the forward pass keeps for the backward, plus the working set of one layer, per device.

  Per device-local token of one microbatch, with a = bytes of the compute dtype (per layer):
  - attention: inputs and norms 2D, q/k/v (H + 2G)K, RoPE'd q/k (H + G)K, context HK, output D;
    the reference kernel's float32 scores and probabilities 8HL (blockwise: none);
  - dense MLP: 2D + 3F; MoE: router logits 4E (float32), 2D + cf k (2D + 3F_expert)
    (dispatch buffers, expert hidden, combine) and shared experts 3F_shared;
  - heads, MLP hidden and vocabulary divide over the mesh axes of their rules.
  Remat: `none` keeps every layer's tensors; `full` keeps each layer's input (D) plus one layer's
  tensors recomputed in the backward; `minimal` (and the name-based policies) keeps the
  projections without batch dimensions (q, k, v, output, dense MLP, router logits) plus one
  layer's tensors. The loss adds one chunk of float32 logits (3 copies) and the float32 [D, V]
  gradient; without chunking the full [tokens, V] logits.
  """
  m, moe, t = cfg.model, cfg.model.moe, cfg.train
  size = lambda name: (
    math.prod(mesh_shape[a] for a in rules[name]) if name in dict(rules.table) else 1
  )
  batch_shards = size("batch")
  rows = t.batch_size // t.microbatches
  tokens = rows * t.seq_len / batch_shards
  a = 2 if m.dtype == "bfloat16" else 4
  d, v, e = m.d_model, m.vocab_size, moe.num_experts
  head_dim = m.head_dim or d // m.num_heads
  hk = m.num_heads * head_dim / size("act_heads")
  gk = (m.num_kv_heads or m.num_heads) * head_dim / size("act_heads")
  f, f_exp = m.d_ff / size("act_mlp"), (moe.d_expert or m.d_ff) / size("act_mlp")
  f_shared = moe.num_shared_experts * (moe.d_expert or m.d_ff) / size("act_mlp")
  reference = m.attention_impl == "reference" or (
    m.attention_impl == "auto" and t.seq_len < 1024 and _backend() == "cpu"
  )
  scores = 8 * m.num_heads / size("act_heads") * t.seq_len if reference else 0.0
  attn = a * (3 * d + 3 * hk + 3 * gk + hk) + scores
  attn_kept = a * (2 * d + hk + 2 * gk)  # input, output, q, k, v projections
  dense = a * (2 * d + 3 * f)
  dense_kept = a * (3 * f) / 1.5
  routed = a * (2 * d + moe.capacity_factor * moe.top_k * (2 * d + 3 * f_exp) + 3 * f_shared)
  moe_layer = routed + 4 * e
  moe_kept = 4 * e + a * 2 * f_shared
  num_moe = m.num_layers // m.moe_every if m.moe_every else 0
  num_dense = m.num_layers - num_moe
  full_layer = max(attn + (moe_layer if num_moe else dense), attn + dense if num_dense else 0.0)
  if m.remat == "none":
    per_token = m.num_layers * attn + num_dense * dense + num_moe * moe_layer
  elif m.remat == "full":
    per_token = m.num_layers * a * d + full_layer
  else:
    kept = m.num_layers * (a * d + attn_kept) + num_dense * dense_kept + num_moe * moe_kept
    per_token = kept + full_layer
  vocab = v / size("act_vocab")
  all_tokens = rows * t.seq_len
  if t.loss_chunk and all_tokens > t.loss_chunk:
    loss = 12 * vocab * min(t.loss_chunk, all_tokens) / batch_shards + 4 * d * v / size("vocab")
    loss += a * d * tokens  # d hidden, kept from the forward
  else:
    loss = 12 * vocab * tokens
  return tokens * per_token + loss


def _backend() -> str:
  import jax

  return jax.default_backend()


def check_memory(estimate: dict[str, float], limit_bytes: float, source: str, mesh_shape) -> None:
  """Stops with the numbers and what to do when the estimate exceeds the device's memory."""
  if estimate["total"] <= limit_bytes:
    return
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  parts = ", ".join(f"{k} {gib(v)}" for k, v in estimate.items() if k != "total")
  raise errors.InsufficientMemoryError(
    f"memory pre-flight: this config needs ~{gib(estimate['total'])} per device ({parts}) but "
    f"a device has {gib(limit_bytes)} ({source}) on mesh {mesh_shape}; use a smaller preset "
    "(e.g. `--config configs/switch_base.py:tiny`), a smaller train.batch_size, or a bigger mesh "
    "(more devices on mesh.expert / mesh.fsdp); override the limit with train.memory_limit_gib"
  )
