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


def estimate_memory_bytes(
  params, cfg, mesh_shape: dict[str, int], rules: sharding.Rules
) -> dict[str, float]:
  """Bytes per device for one training step, before anything is compiled.

  Args:
    params: pytree of `jax.ShapeDtypeStruct` carrying `NamedSharding`s (the abstract parameters).
    cfg: the validated config.
    mesh_shape: resolved mesh axis sizes.
    rules: the sharding rules (which mesh axes split the batch).

  Returns:
    dict with `params`, `optimizer` (AdamW: two float32 moments, sharded like the parameters),
    `gradients`, `activations` and `total`, all bytes per device. The activation term is an
    estimate of what backprop keeps per layer, per device-local token, float32:
      attention ~ 10*D + 2*H*L (q, k, v, out, norms, residuals; scores and probabilities),
      dense MLP ~ 2*D + 3*F, MoE ~ 4*D + cf*K*(2*D + 3*F_expert) + 4*E (buffers, hidden, router),
    plus logits ~ 3*V per token (logits, log-softmax, gradient).
  """
  import jax  # local: config_lib stays importable without a backend

  def per_device(x) -> float:
    shards = 1
    spec = getattr(x.sharding, "spec", ())
    for part in spec:
      for axis in (part if isinstance(part, tuple) else (part,)) if part else ():
        shards *= mesh_shape[axis]
    return x.size * x.dtype.itemsize / shards

  param_bytes = sum(per_device(x) for x in jax.tree.leaves(params))
  m, moe, t = cfg.model, cfg.model.moe, cfg.train
  batch_shards = math.prod(mesh_shape[a] for a in rules["batch"])
  tokens = t.batch_size * t.seq_len / batch_shards
  d, f, v, e = m.d_model, m.d_ff, m.vocab_size, moe.num_experts
  f_exp = moe.d_expert or f
  num_moe = m.num_layers // m.moe_every if m.moe_every else 0
  per_token = m.num_layers * (10 * d + 2 * m.num_heads * t.seq_len)
  per_token += (m.num_layers - num_moe) * (2 * d + 3 * f)
  per_token += num_moe * (4 * d + moe.capacity_factor * moe.top_k * (2 * d + 3 * f_exp) + 4 * e)
  per_token += 3 * v
  act_bytes = 4 * tokens * per_token
  est = {
    "params": param_bytes,
    "optimizer": 2 * param_bytes * 4 / max(1, _mean_itemsize(params)),
    "gradients": param_bytes,
    "activations": act_bytes,
  }
  est["total"] = sum(est.values())
  return est


def _mean_itemsize(params) -> float:
  import jax

  leaves = jax.tree.leaves(params)
  total = sum(x.size for x in leaves)
  return sum(x.size * x.dtype.itemsize for x in leaves) / max(1, total)


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
