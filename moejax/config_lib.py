"""The config schema (a locked, typed ConfigDict) and its validation with one-line errors.

Every config file in configs/ starts from `default_config()` and changes values, so every key the
code reads is defined here, once. The ConfigDict is locked (a misspelt key fails where it is
written, with ml_collections' "did you mean") and typed (assigning a value of another type fails;
optional values are typed placeholders whose None means "derive it", never 0). `validate` checks
the values and their combinations, and runs before anything is compiled.

Router families own their options: `model.moe.<family>` is built from each registered family's
`Options` dataclass (moejax/model/routers/). Modules outside moejax that register routers or data
sources are named in `extensions` and imported before a saved config is read again.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import ml_collections
from absl import logging
from ml_collections import config_dict

from moejax import config_mesh, errors, faults, sharding
from moejax.model import latent_attention, routers
from moejax.ops import attention as attention_ops
from moejax.ops import remat as remat_ops

ConfigError = errors.ConfigError  # the error every check below raises
# The mesh section's helpers live in config_mesh; these names are the public ones.
rules_from_config = config_mesh.rules_from_config
resolve_mesh_shape = config_mesh.resolve_mesh_shape
ACTIVATIONS = ("gelu", "relu", "swiglu")
DISPATCHES = ("capacity", "dropless", "all_to_all")  # moejax/model/moe_layer.py
GROUP_LAYOUTS = ("sequence", "position")
DTYPES = ("float32", "bfloat16")
DECODE_POLICIES = ("fail", "skip")


def default_config() -> ml_collections.ConfigDict:
  """The schema: every key any moejax code reads, with CPU-friendly defaults (locked)."""
  c = ml_collections.ConfigDict()
  # Comma-separated modules imported before the config is used: routers or data sources that
  # register themselves from outside moejax (e.g. "moejax.proj.moex").
  c.extensions = ""

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096  # also the sentencepiece vocabulary size
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4
  m.head_dim = config_dict.placeholder(int)  # None = d_model // num_heads
  m.d_ff = 1024
  m.activation = "gelu"
  m.moe_every = 2  # layer i is MoE when (i + 1) % moe_every == 0; 0 = dense model
  m.first_dense_layers = 0  # layers 0 .. n-1 are dense whatever moe_every (DeepSeek-V3)
  m.dtype = "float32"  # compute dtype; router math stays float32
  # Storage dtype of the parameters (the only copy: no separate float32 master weights); router
  # kernels and the DeepSeek bias stay float32. The optimizer updates in float32 (optim).
  m.param_dtype = "float32"
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.init_std = 0.02
  m.num_kv_heads = config_dict.placeholder(int)  # grouped-query attention; None = num_heads
  m.qk_norm = False  # RMSNorm of q and k over head_dim before RoPE (Qwen3)
  m.qk_norm_scope = "head"  # QK-norm over each head ("head") or all heads at once ("all_heads")
  m.qkv_bias = False  # learned biases on the q, k and v projections (Qwen2), none on the output
  m.attention = "mha"  # or "mla": multi-head latent attention with the options model.mla.*
  m.mla = ml_collections.ConfigDict(dataclasses.asdict(latent_attention.MLAOptions()))
  m.attention_impl = "auto"  # auto, reference, blockwise, xla, tpu_splash (moejax/ops/attention)
  m.scan_layers = False  # nnx.scan over units of moe_every layers; params get a layer axis
  m.remat = "none"  # per-block activation checkpointing: none, full, minimal, ... (ops/remat)

  m.moe = moe = ml_collections.ConfigDict()
  moe.router = "switch"  # a family or alias of moejax/model/routers (its options: moe.<family>)
  moe.dispatch = "capacity"
  moe.num_experts = 8
  moe.top_k = 1
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.group_size = 256  # tokens that compete for capacity; fixed by config, never by devices
  moe.group_layout = "sequence"  # or "position": a group = one position of group_size sequences
  moe.eval_dispatch = config_dict.placeholder(str)  # dispatch at evaluation; None = moe.dispatch
  # dropless with experts split over devices: each device sends at most this many times a
  # balanced routing's pairs to each expert shard; the overflow is dropped and reported.
  moe.exchange_factor = 2.0
  moe.d_expert = config_dict.placeholder(int)  # expert hidden size; None = model.d_ff
  moe.num_shared_experts = 0  # experts every token uses (DeepSeekMoE), one dense MLP
  moe.shared_expert_gate = False  # scale the shared experts' output by sigmoid(x w) (Qwen2-MoE)
  moe.allow_noncausal = False  # let a token's routing see later tokens of its group (warned)
  for family, options in routers.option_defaults().items():
    if family in moe:
      raise ValueError(f"router family {family!r} collides with the key model.moe.{family}")
    moe[family] = ml_collections.ConfigDict(options)

  c.data = d = ml_collections.ConfigDict()
  d.source = "shakespeare"  # or comma-separated globs of .txt / .jsonl files, or PREFIX:...
  d.jsonl_field = "text"
  d.val_fraction = 0.05
  d.decode_errors = "fail"  # a file (or .jsonl line) that is not UTF-8: "fail" or "skip" it
  d.eval_batches = 8
  # Data at scale (moejax/data/mixture.py): data.source='prepared:DIR' reads a directory written
  # by `python -m moejax.data.prepare`; data.mixture='DIR:WEIGHT,DIR:WEIGHT' (non-empty) trains on
  # weighted prepared directories instead of data.source. prepared_verify: what is checked of
  # each shard at start, "size" (cheap) or "sha256" (reads every shard).
  d.mixture = ""
  d.prepared_verify = "size"

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 32
  t.seq_len = 128
  t.log_every = 20
  t.eval_every = 250
  t.checkpoint_every = 250
  t.keep_checkpoints = 3
  t.seed = 0
  t.memory_limit_gib = config_dict.placeholder(float)  # None = the device's memory
  # Loss over chunks of this many tokens of the global batch, never the float32 [B, L, V]
  # logits at once; 0 (or a batch of at most this many tokens) = the full logits.
  t.loss_chunk = 8192
  # Gradient accumulation: the step runs the batch as this many microbatches one after another
  # (activation memory of one microbatch), same result as one batch (moejax/train_step.py).
  t.microbatches = 1
  t.nonfinite_policy = "halt"  # non-finite loss/grad/aux: "halt" (exit 3) or "skip" the update
  t.debug_poison_step = config_dict.placeholder(int)  # test hook: this 1-based step's loss is NaN

  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3
  o.warmup_steps = 100
  o.end_lr_ratio = 0.1
  o.weight_decay = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.grad_clip = 1.0  # 0 = no clipping
  o.moment_dtype = "float32"  # storage dtype of AdamW's two moments (computed in float32)

  # Sparse upcycling (moejax/upcycle.py): start an MoE run from a dense moejax checkpoint.
  c.init = ini = ml_collections.ConfigDict()
  ini.from_dense = config_dict.placeholder(str)  # a dense workdir, or .../checkpoints/<step>
  ini.from_dense_noise = 0.0  # expert copies get N(0, (noise * std of the dense weight)^2) noise

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # -1 = the devices the other axes leave
  ms.fsdp = 1
  ms.expert = 1
  ms.tensor = 1
  # Logical axis -> comma-separated mesh axes ('' = replicated); see moejax/sharding.py.
  ms.rules = ml_collections.ConfigDict(
    {name: ",".join(axes) for name, axes in sharding.DEFAULT_RULES.items()}
  )
  ms.rules.layers = ""  # the stacked layer axis of scanned models (model/blocks.py): replicated
  # How many hosts (TPU slices, else processes) each axis spans; the rest of the axis stays inside
  # a host. -1 = the remaining hosts: by default data parallelism crosses hosts. See moejax/mesh.py.
  ms.dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})

  # Multi-host start-up (moejax/distributed.py): all three of address/count/id, or none to detect
  # a TPU pod or Slurm job (else one process).
  c.distributed = ds = ml_collections.ConfigDict()
  ds.coordinator_address = config_dict.placeholder(str)  # host:port of process 0
  ds.num_processes = config_dict.placeholder(int)
  ds.process_id = config_dict.placeholder(int)
  ds.initialization_timeout_s = 300  # processes wait this long for each other at start
  ds.heartbeat_timeout_s = 100  # a peer silent this long stops every process
  c.lock()
  return c


def import_extensions(extensions: str) -> None:
  """Imports the comma-separated modules of `extensions` (they register routers or sources)."""
  for name in filter(None, (part.strip() for part in extensions.split(","))):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(
        f"extensions: cannot import {name!r} ({e}); install it or fix the module name"
      ) from None


_POSITIVE = (
  "model.vocab_size",
  "model.num_layers",
  "model.d_model",
  "model.num_heads",
  "model.d_ff",
  "model.head_dim",
  "model.moe.num_experts",
  "model.moe.top_k",
  "model.moe.group_size",
  "model.moe.d_expert",
  "model.num_kv_heads",
  "train.microbatches",
  "train.steps",
  "train.batch_size",
  "train.seq_len",
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.debug_poison_step",
  "data.eval_batches",
)
_NON_NEGATIVE = (
  "model.moe_every",
  "model.first_dense_layers",
  "model.moe.num_shared_experts",
  "optim.warmup_steps",
  "optim.grad_clip",
  "init.from_dense_noise",
  "train.loss_chunk",
)
_ONE_OF = (
  ("model.activation", ACTIVATIONS),
  ("model.qk_norm_scope", ("head", "all_heads")),
  ("model.attention", ("mha", "mla")),
  ("model.dtype", DTYPES),
  ("model.param_dtype", DTYPES),
  ("optim.moment_dtype", DTYPES),
  ("model.remat", tuple(remat_ops.POLICIES)),
  ("model.attention_impl", attention_ops.IMPLS),
  ("model.moe.dispatch", DISPATCHES),
  ("model.moe.group_layout", GROUP_LAYOUTS),
  ("train.nonfinite_policy", faults.POLICIES),
  ("data.decode_errors", DECODE_POLICIES),
  ("data.prepared_verify", ("size", "sha256")),
)


def validate(cfg, num_devices: int) -> dict[str, int]:
  """Checks every value a user can get wrong; returns the resolved mesh shape.

  Raises:
    ConfigError: one line naming the key, the value given and what would be valid.
  """
  for key in _POSITIVE:
    value = _get(cfg, key)
    if value is not None and value <= 0:
      raise ConfigError(f"{key}={value}: must be a positive integer")
  for key in _NON_NEGATIVE:
    if _get(cfg, key) < 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be >= 0 (0 = off)")
  for key, allowed in _ONE_OF:
    if _get(cfg, key) not in allowed:
      raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of: {', '.join(allowed)}")
  eval_dispatch = cfg.model.moe.eval_dispatch
  if eval_dispatch is not None and eval_dispatch not in DISPATCHES:
    raise ConfigError(
      f"model.moe.eval_dispatch={eval_dispatch!r} is not one of: {', '.join(DISPATCHES)} "
      "(or None: the training dispatch)"
    )
  for key in (
    "model.moe.capacity_factor",
    "model.moe.eval_capacity_factor",
    "model.moe.exchange_factor",
  ):
    if _get(cfg, key) <= 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be > 0 (Switch uses 1.25, eval 2.0)")
  if not 0 < cfg.data.val_fraction < 1:
    raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in (0, 1), e.g. 0.05")
  if cfg.optim.learning_rate <= 0:
    raise ConfigError(f"optim.learning_rate={cfg.optim.learning_rate}: must be > 0")
  m = cfg.model
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(
      f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
      "change one or set model.head_dim"
    )
  _validate_large_model(cfg)
  if m.attention == "mla":
    latent_attention.MLAOptions(**m.mla.to_dict())  # raises ConfigError naming the field
  if m.moe.shared_expert_gate and not (m.moe_every and m.moe.num_shared_experts):
    raise ConfigError("model.moe.shared_expert_gate=True needs model.moe.num_shared_experts >= 1")
  if m.moe_every:
    _validate_moe(cfg)
  return config_mesh.validate_mesh(cfg, num_devices)


def _validate_large_model(cfg) -> None:
  """Grouped-query heads, scanned layers, microbatches."""
  m, t = cfg.model, cfg.train
  if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
    raise ConfigError(
      f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} "
      "(each key/value head serves num_heads / num_kv_heads query heads)"
    )
  if (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError(
      f"head dimension {m.head_dim or m.d_model // m.num_heads} must be even for rotary "
      "embeddings; change model.head_dim (or d_model / num_heads)"
    )
  if m.scan_layers and m.first_dense_layers:
    raise ConfigError("model.first_dense_layers > 0 breaks the repeating unit: scan_layers=False")
  unit = m.moe_every if m.moe_every else 1
  if m.scan_layers and m.num_layers % unit:
    raise ConfigError(
      f"model.scan_layers=True scans units of model.moe_every={m.moe_every} layers, but "
      f"model.num_layers={m.num_layers} is not a multiple of {unit}; change num_layers or "
      "set model.scan_layers=False"
    )
  if t.batch_size % t.microbatches:
    raise ConfigError(
      f"train.microbatches={t.microbatches} must divide train.batch_size={t.batch_size}"
    )


def _validate_moe(cfg) -> None:
  moe, t = cfg.model.moe, cfg.train
  if moe.top_k > moe.num_experts:
    raise ConfigError(
      f"model.moe.top_k={moe.top_k} > model.moe.num_experts={moe.num_experts}; "
      f"use top_k in 1..{moe.num_experts}"
    )
  options = routers.options(moe)  # the family's own checks
  router = routers.get(moe.router)
  causal = router.causal_in_sequence(options, routers.settings(moe))
  if not causal and moe.group_layout == "sequence":
    if not moe.allow_noncausal:
      raise ConfigError(
        f"model.moe.router={moe.router!r} (top_k={moe.top_k}, dispatch={moe.dispatch!r}) lets a "
        "token's output depend on later tokens of its routing group, which leaks the future in "
        "a decoder; set model.moe.group_layout='position' (causal) or "
        "model.moe.allow_noncausal=True"
      )
    logging.warning(
      "model.moe.allow_noncausal=True: router %r sees later tokens of its group; training "
      "loss is optimistic and generation will differ from training",
      moe.router,
    )
  rows = t.batch_size // t.microbatches  # the rows one forward pass sees
  what = "train.batch_size" if t.microbatches == 1 else "train.batch_size / train.microbatches"
  tokens = rows * t.seq_len
  if moe.group_layout == "position" and rows % moe.group_size:
    raise ConfigError(
      f"model.moe.group_size={moe.group_size} must divide {what}={rows} "
      "with model.moe.group_layout='position' (a group = one position of group_size sequences)"
    )
  if tokens % moe.group_size:
    raise ConfigError(
      f"model.moe.group_size={moe.group_size} does not divide {what} * train.seq_len"
      f" = {tokens}; use a divisor such as {math.gcd(tokens, moe.group_size)} or {t.seq_len}"
    )


def _get(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg
