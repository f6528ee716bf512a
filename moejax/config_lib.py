"""Default config and its validation with one-line errors (the memory pre-flight: memory.py).

Every config file in configs/ starts from `default_config()` and changes values, so every key the
code reads is defined here, once. `validate` runs before anything is compiled.
"""

from __future__ import annotations

import math

import ml_collections
from absl import logging

from moejax import sharding

ACTIVATIONS = ("gelu", "relu", "swiglu")
DISPATCHES = ("capacity", "dropless", "all_to_all")  # moejax/model/moe_layer.py
GROUP_LAYOUTS = ("sequence", "position")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A user-fixable configuration error; the message names the key, the value and the fix."""


def default_config() -> ml_collections.ConfigDict:
  """The schema: every key any moejax code reads, with CPU-friendly defaults."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096  # also the sentencepiece vocabulary size
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4
  m.head_dim = 0  # 0 = d_model // num_heads
  m.d_ff = 1024
  m.activation = "gelu"
  m.moe_every = 2  # layer i is MoE when (i + 1) % moe_every == 0; 0 = dense model
  m.dtype = "float32"  # compute dtype; parameters and router math stay float32
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.init_std = 0.02

  m.moe = moe = ml_collections.ConfigDict()
  moe.router = "switch"
  moe.dispatch = "capacity"
  moe.num_experts = 8
  moe.top_k = 1
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.group_size = 256  # tokens that compete for capacity; fixed by config, never by devices
  moe.group_layout = "sequence"  # or "position": a group = one position of group_size sequences
  moe.d_expert = 0  # expert hidden size; 0 = model.d_ff
  moe.allow_noncausal = False  # let a token's routing see later tokens of its group (warned)
  moe.jitter_eps = 0.0
  moe.normalize_top_k = False
  moe.router_init_std = 0.02
  # Family options (each router reads only its own; see its CONFIG_OPTIONS).
  moe.second_expert_policy = "random"  # gshard_top2: "random" (GShard) or "all"
  moe.noise_epsilon = 1e-2  # noisy_top_k: added to softplus(noise logits)
  moe.slots_per_expert = 1  # soft_moe
  moe.soft_init_scale = 1.0  # soft_moe: initial value of the learned logit scale
  moe.assignment_iterations = 100  # base: balanced-assignment solver iterations
  moe.num_shared_experts = 0  # deepseek: experts every token uses
  moe.route_scale = 1.0  # deepseek: multiplies the normalised gate values
  moe.bias_update_rate = 1e-3  # deepseek: aux-loss-free balancing bias step (gamma)
  moe.num_expert_groups = 1  # deepseek: group-limited routing (1 = off)
  moe.top_expert_groups = 1  # deepseek: groups kept per token
  moe.moex_stop_gradient_stats = False  # moex: no gradient through the encoder statistics
  moe.moex_learned_mix = 0.0  # moex: score = -Phi + mix * learned logits (0 = pure MoE-X)
  moe.moex_balance_loss_weight = 0.0  # moex: scales its load_balance_loss (0 = none)
  moe.moex_log_l0_correlation = True  # moex: eval metric score vs true expert L0 rank corr
  moe.aux_loss_weights = ml_collections.ConfigDict(
    {
      "load_balance_loss": 1e-2,
      "router_z_loss": 1e-3,
      "importance_loss": 1e-2,
      "load_loss": 1e-2,
      "sequence_balance_loss": 1e-4,
    }
  )

  c.data = d = ml_collections.ConfigDict()
  d.source = "shakespeare"  # or comma-separated globs of .txt / .jsonl files
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
  t.memory_limit_gib = 0.0  # 0 = detect the device's memory
  t.nonfinite_policy = "halt"  # non-finite loss/grad/aux: "halt" (exit 3) or "skip" the update
  t.debug_poison_step = 0  # test hook: the loss of this 1-based step is NaN (0 = off)

  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3
  o.warmup_steps = 100
  o.end_lr_ratio = 0.1
  o.weight_decay = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.grad_clip = 1.0

  # Sparse upcycling (moejax/upcycle.py): start an MoE run from a dense moejax checkpoint.
  c.init = ini = ml_collections.ConfigDict()
  ini.from_dense = ""  # a dense run's workdir (its latest step) or WORKDIR/checkpoints/<step>
  ini.from_dense_noise = 0.0  # expert copies get N(0, (noise * std of the dense weight)^2) noise

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.expert = 1
  ms.tensor = 1
  # Logical axis -> comma-separated mesh axes ('' = replicated); see moejax/sharding.py.
  ms.rules = ml_collections.ConfigDict(
    {name: ",".join(axes) for name, axes in sharding.DEFAULT_RULES.items()}
  )
  # How many hosts (TPU slices, else processes) each axis spans; the rest of the axis stays inside
  # a host. -1 = the remaining hosts: by default data parallelism crosses hosts. See moejax/mesh.py.
  ms.dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})

  # Multi-host start-up (moejax/distributed.py): all three of address/count/id, or none to detect
  # a TPU pod or Slurm job (else one process).
  c.distributed = ds = ml_collections.ConfigDict()
  ds.coordinator_address = ""  # host:port of process 0
  ds.num_processes = 0
  ds.process_id = -1
  ds.initialization_timeout_s = 300  # processes wait this long for each other at start
  ds.heartbeat_timeout_s = 100  # a peer silent this long stops every process
  return c


def switch_base_family(preset: str, recipe: str) -> ml_collections.ConfigDict:
  """The Switch-Base trunk every recipe in configs/ starts from (full size or preset `tiny`).

  Full: 12 layers, d_model 768, 12 heads, d_ff 3072, GELU, MoE every other layer, 128 experts,
  top-1 Switch routing, capacity factor 1.25 (eval 2.0). `tiny`: the CPU-sized member (4 layers,
  d_model 256, d_ff 512, 8 experts, vocab 2048, 600 steps of 16 x 128 tokens; < 10 min on 2 cores).
  Recipes change only what their router needs, so their results compare.

  Args:
    preset: "" (full) or "tiny".
    recipe: the calling config file, named in the error for an unknown preset.
  """
  c = default_config()
  m, moe, t = c.model, c.model.moe, c.train
  m.vocab_size = 32_000
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
  m.activation = "gelu"
  m.moe_every = 2
  moe.router, moe.num_experts, moe.top_k = "switch", 128, 1
  moe.capacity_factor, moe.eval_capacity_factor = 1.25, 2.0
  moe.group_size = 1024
  t.steps, t.batch_size, t.seq_len = 100_000, 256, 1024
  t.eval_every, t.checkpoint_every, t.log_every = 2000, 2000, 100
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 2000
  if preset == "tiny":
    # Sized so the run takes < 10 minutes on 2 CPU cores (~0.55 s/step, compute bound).
    m.vocab_size = 2048
    m.num_layers, m.d_model, m.num_heads, m.d_ff = 4, 256, 4, 512
    moe.num_experts = 8
    moe.group_size = 256
    t.steps, t.batch_size, t.seq_len = 600, 16, 128
    t.eval_every, t.checkpoint_every, t.log_every = 200, 200, 20
    c.optim.learning_rate, c.optim.warmup_steps = 2e-3, 50
  elif preset:
    raise ValueError(f"{recipe}: unknown preset {preset!r}; known: '' (full), 'tiny'")
  return c


def rules_from_config(mesh_cfg) -> dict[str, tuple[str, ...]]:
  return {k: tuple(a for a in v.split(",") if a) for k, v in mesh_cfg.rules.items()}


def _keys(cfg, prefix=""):
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _keys(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def _get(cfg, key):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 axis filled with the remaining devices."""
  shape = {a: int(mesh_cfg[a]) for a in sharding.MESH_AXES}
  fill = [a for a, n in shape.items() if n == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {fill}; set the others to sizes")
  for a, n in shape.items():
    if n == 0 or n < -1:
      raise ConfigError(f"mesh.{a}={n}: must be a positive size or -1 (= the remaining devices)")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh: the fixed axes {shape} use {fixed} devices, which does not divide the "
        f"{num_devices} available; choose sizes whose product divides {num_devices}"
      )
    shape[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
      f"mesh {shape} needs {fixed} devices but {num_devices} are available; "
      f"make the product {num_devices} or set one axis to -1"
    )
  return shape


def validate(cfg, num_devices: int) -> dict[str, int]:
  """Checks every value a user can get wrong; returns the resolved mesh shape.

  Raises:
    ConfigError: one line naming the key, the value given and what would be valid.
  """
  from moejax import input_checks  # local: it builds on this module
  from moejax.model import routers  # local: routers are a model concern, the registry a list

  known = sorted(_keys(default_config()))
  unknown = sorted(set(_keys(cfg)) - set(known) - _rule_keys(cfg))
  if unknown:
    raise ConfigError(
      f"unknown config keys {unknown}{input_checks.closest_keys(unknown, known)}; "
      "see moejax/config_lib.py for valid keys"
    )
  missing = sorted(set(known) - set(_keys(cfg)))
  if missing:
    raise ConfigError(f"config is missing keys {missing}; start from config_lib.default_config()")
  input_checks.check_types(cfg, default_config())
  input_checks.check_config(cfg)

  positive = [
      "model.vocab_size", "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff",
      "model.moe.num_experts", "model.moe.top_k", "model.moe.group_size", "train.steps",
      "train.batch_size", "train.seq_len", "train.log_every", "train.eval_every",
      "train.checkpoint_every", "train.keep_checkpoints", "data.eval_batches",
  ]  # fmt: skip
  for key in positive:
    if _get(cfg, key) <= 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be a positive integer")
  for key in ("model.head_dim", "model.moe.d_expert", "model.moe_every"):
    if _get(cfg, key) < 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be >= 0 (0 = default)")
  m, moe, t = cfg.model, cfg.model.moe, cfg.train
  _one_of("model.activation", m.activation, ACTIVATIONS)
  _one_of("model.dtype", m.dtype, DTYPES)
  _one_of("model.moe.dispatch", moe.dispatch, DISPATCHES)
  _one_of("model.moe.group_layout", moe.group_layout, GROUP_LAYOUTS)
  _one_of("model.moe.router", moe.router, routers.ROUTERS)
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(
      f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
      "change one or set model.head_dim"
    )
  if moe.top_k > moe.num_experts:
    raise ConfigError(
      f"model.moe.top_k={moe.top_k} > model.moe.num_experts={moe.num_experts}; "
      f"use top_k in 1..{moe.num_experts}"
    )
  if moe.router == "base" and moe.group_size % moe.num_experts:
    raise ConfigError(
      f"model.moe.router='base' needs model.moe.group_size={moe.group_size} to be a multiple of "
      f"model.moe.num_experts={moe.num_experts} (exactly S/E tokens per expert)"
    )
  if (cfg.init.from_dense and moe.router == "moex" and m.moe_every
      and not cfg.init.from_dense_noise and not moe.moex_learned_mix):  # fmt: skip
    # moex scores experts from their own weights only: exact copies tie, the tied experts are
    # chosen together with equal gates, get equal gradients and stay copies for good.
    raise ConfigError(
      "init.from_dense with model.moe.router='moex' and init.from_dense_noise=0: the experts "
      "start as exact copies that moex cannot tell apart, so they are chosen together and stay "
      "copies; set init.from_dense_noise (e.g. 0.01) or model.moe.moex_learned_mix > 0"
    )
  options = routers.router_options(moe.router, moe)
  causal = routers.get_router_class(moe.router).causal_in_sequence(moe.top_k, **options)
  if not causal and moe.group_layout == "sequence" and not moe.allow_noncausal:
    raise ConfigError(
      f"model.moe.router={moe.router!r} (top_k={moe.top_k}) lets a token's output depend on "
      "later tokens of its routing group, which leaks the future in a decoder; set "
      "model.moe.group_layout='position' (causal) or model.moe.allow_noncausal=True"
    )
  if not causal and moe.group_layout == "sequence":
    logging.warning(
      "model.moe.allow_noncausal=True: router %r sees later tokens of its group; training "
      "loss is optimistic and generation will differ from training",
      moe.router,
    )
  for key in ("model.moe.capacity_factor", "model.moe.eval_capacity_factor"):
    if _get(cfg, key) <= 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be > 0 (Switch uses 1.25, eval 2.0)")
  if not 0 < cfg.data.val_fraction < 1:
    raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in (0, 1), e.g. 0.05")
  if cfg.optim.learning_rate <= 0:
    raise ConfigError(f"optim.learning_rate={cfg.optim.learning_rate}: must be > 0")
  if cfg.optim.warmup_steps < 0 or cfg.optim.grad_clip < 0:
    raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0 (0 = off)")
  unknown_w = sorted(set(moe.aux_loss_weights) - set(routers.AUX_LOSSES))
  if unknown_w:
    raise ConfigError(
      f"model.moe.aux_loss_weights has unknown losses {unknown_w}; known: {routers.AUX_LOSSES}"
    )
  tokens = t.batch_size * t.seq_len
  if moe.group_layout == "position" and t.batch_size % moe.group_size:
    raise ConfigError(
      f"model.moe.group_size={moe.group_size} must divide train.batch_size={t.batch_size} "
      "with model.moe.group_layout='position' (a group = one position of group_size sequences)"
    )
  if tokens % moe.group_size:
    raise ConfigError(
      f"model.moe.group_size={moe.group_size} does not divide train.batch_size * train.seq_len"
      f" = {tokens}; use a divisor such as {math.gcd(tokens, moe.group_size)} or {t.seq_len}"
    )

  rules = rules_from_config(cfg.mesh)
  for name, axes in rules.items():
    bad = [a for a in axes if a not in sharding.MESH_AXES]
    if bad:
      raise ConfigError(f"mesh.rules.{name}={cfg.mesh.rules[name]!r}: unknown mesh axes {bad}; "
                        f"use a comma-separated subset of {sharding.MESH_AXES}")  # fmt: skip
  shape = resolve_mesh_shape(cfg.mesh, num_devices)
  if moe.num_experts % shape["expert"]:
    raise ConfigError(
      f"model.moe.num_experts={moe.num_experts} is not divisible by mesh.expert="
      f"{shape['expert']}; use a multiple of {shape['expert']} experts or a smaller expert axis"
    )
  batch_shards = math.prod(shape[a] for a in rules["batch"])
  experts_split = math.prod(shape[a] for a in rules["expert"]) > 1
  if moe.dispatch == "all_to_all" and experts_split and (tokens // moe.group_size) % batch_shards:
    raise ConfigError(
      f"model.moe.dispatch='all_to_all' needs the {tokens // moe.group_size} routing groups per "
      f"batch to split evenly over the {batch_shards} devices of the batch axes {rules['batch']}"
      f" of {shape}; use a smaller model.moe.group_size or a bigger train.batch_size"
    )
  if t.batch_size % batch_shards:
    raise ConfigError(
      f"train.batch_size={t.batch_size} is not divisible by the {batch_shards} devices the batch"
      f" is split over (mesh axes {rules['batch']} of {shape}); use a multiple of {batch_shards}"
    )
  return shape


def _rule_keys(cfg) -> set[str]:
  # Users may add rules for new logical names; they are checked against mesh axes above.
  return {f"mesh.rules.{k}" for k in cfg.mesh.rules}


def _one_of(key, value, allowed):
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
