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
  return x.size * x.dtype.itemsize / _shards(x, mesh_shape)


def _shards(x, mesh_shape, axes=None) -> int:
  """Shards of `x` over all its mesh axes, or only over `axes`."""
  n = 1
  for part in getattr(getattr(x, "sharding", None), "spec", ()):
    for axis in (part if isinstance(part, tuple) else (part,)) if part else ():
      n *= mesh_shape[axis] if axes is None or axis in axes else 1
  return n


# Calibration against XLA's memory analysis of the compiled train step (`--dry_run`, XLA:CPU;
# docs/PERFORMANCE.md, "Dry runs"). Bytes per saved activation element: the compute dtype, plus a
# float32 copy XLA:CPU keeps of bfloat16 tensors.
_ACT_BYTES = {"float32": 4, "bfloat16": 6}
# FSDP: a scanned unit's weights gathered for the forward and the backward and its full gradient
# (XLA:CPU all-reduces it), plus compute-dtype copies when that differs from float32.
_GATHERED_COPIES = {"float32": 2, "bfloat16": 5}
_VOCAB_COPIES = 6  # embedding and unembedding: gradients, float32 accumulator, gathered copies


def estimate_memory_bytes(
  state, cfg, mesh_shape: dict[str, int], rules: sharding.Rules
) -> dict[str, float]:
  """Bytes per device for one training step, before anything is compiled.

  Args:
    state: the abstract train state (or only its parameters): `jax.ShapeDtypeStruct`s carrying
      `NamedSharding`s.
    cfg: the validated config.
    mesh_shape: resolved mesh axis sizes.
    rules: the sharding rules (which mesh axes split the batch, heads, vocabulary, weights).

  Returns:
    dict with `params`, `optimizer` (the optimizer state as stored), `gradients` (where weights
    are sharded over FSDP axes, the gathered weights and full gradients of the layers in flight;
    with microbatches the float32 accumulator), `activations` (`activation_bytes`) and `total`,
    all bytes per device.
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
  gathered = set(rules["embed"]) | set(rules["expert_embed"])
  in_flight = _unit_gathered_bytes(params, cfg, mesh_shape, gathered)
  if isinstance(params, dict) and "stack" in params:
    in_flight *= _GATHERED_COPIES[cfg.model.dtype]
  # The gradients themselves need no memory of their own in XLA's assignment: the optimizer
  # update consumes them as they are produced and writes into the donated state (measured).
  grad_bytes = in_flight + (4 * elements if cfg.train.microbatches > 1 else 0)
  est = {
    "params": param_bytes,
    "optimizer": opt_bytes,
    "gradients": grad_bytes,
    "activations": activation_bytes(cfg, mesh_shape, rules),
  }
  est["total"] = sum(est.values())
  return est


def _unit_gathered_bytes(params, cfg, mesh_shape, gathered_axes) -> float:
  """Bytes of one scan unit's (or, unscanned, every layer's) weights gathered over the FSDP
  axes (0 when no weight is split over them): XLA:CPU issues the gathers of an unrolled layer
  loop all at once (measured: about one copy of every layer in flight), a scanned one a unit at a
  time."""
  import jax

  if not any(mesh_shape[a] > 1 for a in gathered_axes) or not isinstance(params, dict):
    return 0.0
  layers = params.get("stack", params.get("blocks", {}))
  total = sum(
    _per_device_bytes(x, mesh_shape) * _shards(x, mesh_shape, gathered_axes)
    for x in jax.tree.leaves(layers)
  )
  if "stack" in params:
    return total / max(1, cfg.model.num_layers // _unit(cfg))
  return total


def _unit(cfg) -> int:
  return cfg.model.moe_every if cfg.model.moe_every else 1


def activation_bytes(cfg, mesh_shape: dict[str, int], rules: sharding.Rules) -> float:
  """What the forward pass keeps for the backward plus the working set of one unit, per device.

  s = bytes per activation element (4 float32; 6 bfloat16: XLA:CPU adds float32 copies). Per
  device-local token of one microbatch (T tokens; the MoE layer sees T_moe = the batch over its
  'group' axes, all of them on the other batch axes) of one layer, in elements:
  - attention: 3D + 3(H + 2G)K (norms, q/k/v and their RoPE'd copies, context, output); the
    plain kernel's float32 scores and probabilities 2HL (blockwise: two float32 512 x 512
    tiles per head and row in flight, per layer unrolled, per unit scanned);
  - dense MLP: 2D + F (2F with SwiGLU); MoE: 2D, expert side (4F_expert + 2D) per (token,
    choice) slot (k cf per token, k for dropless, k x exchange_factor for expert-parallel
    dropless; the buffer's tokens over its expert_group and act_expert axes), shared experts
    4F_shared; the routing groups (D, and 4E float32 router logits per T_moe token) twice, as
    working set only;
  - heads, MLP and vocabulary widths divide over the mesh axes of their rules.
  Remat `none` keeps every layer's tensors (and, under FSDP, XLA keeps each layer's gathered
  weights: `gradients`); `full` keeps each layer's input (D) plus one unit recomputed in the
  backward; `minimal` and the name-based policies keep the projections without batch dimensions
  (q, k, v, output, dense MLP) plus one unit. The loss adds one chunk of float32 logits (3
  copies) and the embedding and unembedding copies (their gradients and float32 accumulator).
  """
  m, moe, t = cfg.model, cfg.model.moe, cfg.train
  size = lambda name: math.prod(mesh_shape[a] for a in _rule(rules, name))
  batch_shards = size("batch")
  rows = t.batch_size // t.microbatches
  tokens = rows * t.seq_len / batch_shards
  moe_tokens = rows * t.seq_len / size("group")
  s = _ACT_BYTES[m.dtype]
  d, v, e = m.d_model, m.vocab_size, moe.num_experts
  head_dim = m.head_dim or d // m.num_heads
  hk = m.num_heads * head_dim / size("act_heads")
  gk = (m.num_kv_heads or m.num_heads) * head_dim / size("act_heads")
  f, f_exp = m.d_ff / size("act_mlp"), (moe.d_expert or m.d_ff) / size("act_mlp")
  f_shared = moe.num_shared_experts * (moe.d_expert or m.d_ff) / size("act_mlp")
  reference = m.attention_impl == "reference" or (
    m.attention_impl == "auto" and t.seq_len < 1024 and _backend() == "cpu"
  )
  heads = m.num_heads / size("act_heads")
  scores = 2 * 4 * heads * t.seq_len if reference else 0.0
  attn = tokens * (s * (3 * d + 3 * (hk + 2 * gk)) + scores)
  # The blockwise kernel's float32 [block_q, block_k] tiles, two per layer in flight.
  tiles = 0.0 if reference else 2 * 4 * heads * 512 * min(512, t.seq_len) * rows / batch_shards
  attn_kept = tokens * s * (2 * d + hk + 2 * gk)
  gates = 2 if m.activation == "swiglu" else 1  # hidden tensors kept per MLP (the rest recomputed)
  dense = tokens * s * (2 * d + gates * f)
  dense_kept = tokens * s * gates * f
  # Expert buffers are [expert_group, act_expert, slots]; expert-parallel dropless receives
  # exchange_factor times its pairs (the static per-destination bound).
  slots = moe.top_k * (1.0 if moe.dispatch == "dropless" else moe.capacity_factor)
  if moe.dispatch == "dropless" and size("act_expert") > 1:
    slots *= moe.exchange_factor
  buffer_tokens = rows * t.seq_len / (size("expert_group") * size("act_expert"))
  expert_side = buffer_tokens * slots * s * (4 * f_exp + 2 * d)
  moe_layer = tokens * s * (2 * d + 4 * f_shared) + expert_side
  moe_kept = tokens * s * 2 * f_shared
  groups = 2 * moe_tokens * (s * d + 4 * e) if num_moe_layers(cfg) else 0.0
  num_moe = num_moe_layers(cfg)
  num_dense = m.num_layers - num_moe
  unit = (m.moe_every - 1) * dense + moe_layer + groups if num_moe else dense
  unit += _unit(cfg) * (attn + tiles)
  if m.remat == "none":
    kept = m.num_layers * attn + num_dense * dense + num_moe * moe_layer + groups
    kept += (_unit(cfg) if m.scan_layers else m.num_layers) * tiles
  elif m.remat == "full":
    kept = m.num_layers * tokens * s * d + unit
  else:
    kept = m.num_layers * (tokens * s * d + attn_kept) + num_dense * dense_kept
    kept += num_moe * moe_kept + unit
  vocab = v / size("act_vocab")
  all_tokens = rows * t.seq_len
  chunk = min(t.loss_chunk, all_tokens) if t.loss_chunk else all_tokens
  loss = 12 * vocab * chunk / batch_shards + _VOCAB_COPIES * 4 * d * v / size("vocab")
  return kept + loss


def num_moe_layers(cfg) -> int:
  m = cfg.model
  return m.num_layers // m.moe_every if m.moe_every else 0


def _rule(rules: sharding.Rules, name: str) -> tuple[str, ...]:
  return dict(rules.table).get(name, ())


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
