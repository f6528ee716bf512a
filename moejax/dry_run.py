"""Dry run: compile a config's real train step for N simulated devices, allocate nothing.

  python -m moejax.train --config configs/mixtral_8x7b.py --dry_run --devices 64 \\
      [--device tpu-v5p | --device_memory_gib 95] [--dry_run_json out.json] [--config.mesh.fsdp=64]

The step is the one `moejax.train` jits (`moejax.training.program_for`: same function, same
shardings, same donation), lowered from `jax.ShapeDtypeStruct`s of the train state and one batch and
compiled by XLA for a mesh of N CPU devices (`--xla_force_host_platform_device_count`, set before
JAX starts its backend). XLA's per-device memory analysis (arguments, outputs, temporaries) is
printed beside the pre-flight estimate (moejax/memory.py), with the compile time, and compared
with a device's memory. XLA:CPU's buffer assignment approximates an accelerator's: fusion,
scheduling and layouts differ by backend (CPU may keep float32 copies of bfloat16 operands; TPU
and GPU compilers schedule collectives and rematerialise differently), so treat the numbers as
an estimate with a margin, not as the accelerator's exact peak. Attention kernels that exist only
on an accelerator (splash) are compiled as the blockwise kernel, which has the same memory
profile.
"""

from __future__ import annotations

import json
import time

import jax

from moejax import errors, memory, paths, training

GIB = 2**30
# Memory per device (GiB) of common accelerators, for --device.
DEVICE_MEMORY_GIB = {
  "h100": 80,
  "h200": 141,
  "a100-40": 40,
  "a100-80": 80,
  "tpu-v4": 32,
  "tpu-v5e": 16,
  "tpu-v5p": 95,
  "tpu-v6e": 32,
}
XLA_CPU_NOTE = (
  "XLA:CPU's memory analysis approximates an accelerator's (fusion, scheduling and layouts "
  "differ by backend); keep a margin"
)


def device_memory(device: str | None, memory_gib: float | None) -> tuple[int | None, str]:
  """(bytes, name) of the device to compare with; (None, '') when neither is given."""
  if memory_gib is not None:
    if memory_gib <= 0:
      raise errors.ConfigError(f"--device_memory_gib={memory_gib}: must be > 0")
    return int(memory_gib * GIB), f"{memory_gib:g} GiB device"
  if device is None:
    return None, ""
  name = device.lower()
  if name not in DEVICE_MEMORY_GIB:
    raise errors.ConfigError(
      f"--device={device!r} is not in the table ({', '.join(DEVICE_MEMORY_GIB)}); "
      "give --device_memory_gib instead"
    )
  return DEVICE_MEMORY_GIB[name] * GIB, f"{name} ({DEVICE_MEMORY_GIB[name]} GiB)"


def use_simulated_devices(count: int) -> None:
  """Makes JAX start with `count` CPU devices; refuses when its backend already started."""
  if count <= 0:
    raise errors.ConfigError(f"--devices={count}: must be a positive number of devices")
  from jax._src import xla_bridge

  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  have = len(jax.devices("cpu"))
  if have != count:
    raise errors.ConfigError(
      f"--devices={count}: JAX already has {have} CPU devices (XLA_FLAGS "
      "--xla_force_host_platform_device_count or an earlier start); unset it or pass "
      f"--devices={have}"
    )


def dry_run(cfg, devices, device_bytes: int | None = None, device_name: str = "") -> dict:
  """Compiles the train step of `cfg` for `devices` (CPU) and returns the memory report.

  Returns:
    {"devices", "mesh", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
    "total_bytes_per_device", "estimate_bytes_per_device", "estimate" (the pre-flight's parts),
    "compile_seconds", "device_memory_bytes", "fits"} (fits is None without a device).
  """
  if cfg.model.attention_impl == "tpu_splash":
    cfg.model.attention_impl = "blockwise"  # same memory profile; splash needs a TPU
  program = training.program_for(cfg, devices)
  mesh_shape = program.mesh_shape
  estimate = memory.estimate_memory_bytes(program.abs_state, cfg, mesh_shape, program.rules)
  start = time.perf_counter()
  compiled = program.lower().compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  report = {
    "devices": len(devices),
    "mesh": mesh_shape,
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(stats.alias_size_in_bytes),
    "temp_bytes": int(stats.temp_size_in_bytes),
    "estimate": {k: float(v) for k, v in estimate.items()},
    "estimate_bytes_per_device": float(estimate["total"]),
    "compile_seconds": seconds,
    "num_params": program.num_params,
    "device_memory_bytes": device_bytes,
    "device": device_name,
  }
  # Donated outputs reuse their arguments' buffers: count them once.
  report["total_bytes_per_device"] = (
    report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
  )
  report["fits"] = (
    None if device_bytes is None else report["total_bytes_per_device"] <= device_bytes
  )
  return report


def format_report(report: dict, config_name: str) -> str:
  """The printed side-by-side table."""
  gib = lambda b: f"{b / GIB:9.2f} GiB"
  est = report["estimate"]
  lines = [
    f"moejax dry run: {config_name}, {report['num_params'] / 1e9:.2f}B parameters, "
    f"{report['devices']} simulated CPU devices, mesh {report['mesh']}",
    f"compile time {report['compile_seconds']:.1f} s",
    f"{'per device':<14}{'XLA':>13}   pre-flight estimate",
    f"{'arguments':<14}{gib(report['argument_bytes'])}   "
    f"params {gib(est['params'])}, optimizer {gib(est['optimizer'])}",
    f"{'outputs':<14}{gib(report['output_bytes'])}   "
    f"({gib(report['alias_bytes']).strip()} of them donated arguments)",
    f"{'temporaries':<14}{gib(report['temp_bytes'])}   "
    f"gradients {gib(est['gradients'])}, activations {gib(est['activations'])}",
    f"{'total':<14}{gib(report['total_bytes_per_device'])}   total {gib(est['total'])} "
    f"({est['total'] / max(report['total_bytes_per_device'], 1):.2f}x XLA)",
  ]
  if report["device_memory_bytes"] is not None:
    verdict = "fits" if report["fits"] else "does NOT fit"
    share = report["total_bytes_per_device"] / report["device_memory_bytes"]
    lines.append(f"{verdict} on {report['device']}: {share:.0%} of its memory per device")
  lines.append(f"note: {XLA_CPU_NOTE}")
  return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
  """The --dry_run_json file: the report's headline numbers (bytes per device)."""
  keys = (
    "devices",
    "mesh",
    "total_bytes_per_device",
    "estimate_bytes_per_device",
    "compile_seconds",
    "device_memory_bytes",
    "fits",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
  )
  paths.write_atomically(paths.resolve(path), json.dumps({k: report[k] for k in keys}, indent=1))
