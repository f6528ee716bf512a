r"""Collective bytes of the whole train step on a simulated mesh, against the analytic minimum.

  python -m benchmarks.collectives --config configs/switch_base.py:tiny --mesh data=2,expert=4 \
      [--devices 8] [--dispatch capacity] [--json OUT] [--config.KEY=VALUE ...]

`--mesh` may be repeated and `--dispatch` may list several (capacity,all_to_all,dropless): each
combination is compiled and a one-row-each summary table follows (`--json` then holds a list).

Run it before renting a pod: it compiles the real train step (moejax/training.py: the function
`moejax.train` jits, with its shardings) for N simulated CPU devices from abstract shapes
(nothing is allocated) and prints, per collective kind, the bytes one device sends per step
(from the compiled HLO, benchmarks/hlo_collectives.py) next to the analytic minimum of the chosen
parallelism (benchmarks/collective_model.py, docs/PERFORMANCE.md), their ratio, the replicated
work (per-device FLOPs x devices / the FLOPs of the same step compiled for one device) and the
number of XLA "Involuntary full rematerialization" warnings. `--json OUT` writes
{"collective_bytes": {kind: bytes}, "minimum_bytes": n, "minimum_terms": {...},
 "collective_ratio": x, "replicated_work": y, "remat_warnings": n, "mesh": {...},
 "dispatch": "...", "devices": N, "compile_seconds": s, "sliced_all_reduce_bytes": b,
 "collective_ratio_reduce_scatter": z}.
XLA:CPU runs the same SPMD partitioner as the accelerators, with one difference that shows: a
sharded (FSDP) gradient is reduced by an all-reduce whose result is sliced to the device's
shard, which XLA's GPU pipeline rewrites into a reduce-scatter (half the bytes; its
reduce-scatter creator pass, absent from XLA:CPU). Those bytes are reported as they compile
(sliced_all_reduce_bytes) and `collective_ratio_reduce_scatter` counts them as the reduce-scatter
a GPU would run. Link speeds are another matter.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.collectives", description=__doc__)
  parser.add_argument("--config", required=True, help="configs/FILE.py[:preset]")
  parser.add_argument(
    "--mesh", required=True, action="append", help="e.g. data=2,expert=4 (unset axes = 1)"
  )
  parser.add_argument("--devices", type=int, default=None, help="default: the largest mesh")
  parser.add_argument("--dispatch", default=None, help="override model.moe.dispatch (a,b,...)")
  parser.add_argument("--json", default=None, help="write the results as JSON here")
  parser.add_argument("--no-single", action="store_true", help="skip the 1-device compile")
  return parser.parse_known_args(argv)


if __name__ == "__main__":
  _ARGS, _OVERRIDES = parse_args(sys.argv[1:])
  _MESHES = [
    {axis: int(size) for axis, size in (part.split("=") for part in mesh.split(","))}
    for mesh in _ARGS.mesh
  ]
  _N = _ARGS.devices or max(int(__import__("math").prod(m.values())) for m in _MESHES)
  # Simulated devices must be set before jax is imported.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_N}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks import collective_model, hlo_collectives  # noqa: E402
from benchmarks.train_step import load_config  # noqa: E402
from moejax import sharding, training  # noqa: E402

REMAT_WARNING = "Involuntary full rematerialization"


def apply_overrides(cfg, overrides):
  """--config.a.b=value pairs onto the (typed) config: value parsed as the field's type."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise SystemExit(f"unknown argument {item!r}: use --config.KEY=VALUE")
    key, value = item[len("--config.") :].split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    current = node[leaf]
    if isinstance(current, bool):
      node[leaf] = value.lower() in ("1", "true", "yes")
    elif current is None:
      node[leaf] = json.loads(value) if value[:1].isdigit() else value
    else:
      node[leaf] = type(current)(value)


@contextlib.contextmanager
def captured_stderr():
  """Captures what C++ (XLA) writes to file descriptor 2; yields a reader of it."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    text = []
    try:
      yield text
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text.append(tmp.read().decode("utf-8", "replace"))


def measure(cfg, devices, *, single_device: bool = True) -> dict:
  """Compiles the train step of `cfg` on `devices` and returns the measurements (see module)."""
  program = training.program_for(cfg, devices)
  start = time.perf_counter()
  with captured_stderr() as log:
    compiled = program.lower().compile()
  seconds = time.perf_counter() - start
  n = len(devices)
  by_kind = hlo_collectives.bytes_by_kind(compiled.as_text(), n)
  terms = collective_model.minimum_bytes(cfg, program.mesh_shape, program.rules, program.abs_state)
  minimum = sum(terms.values())
  total = sum(by_kind.values())
  sliced = hlo_collectives.sliced_all_reduce_bytes(compiled.as_text(), n)
  result = {
    "collective_bytes": by_kind,
    "total_bytes": total,
    "minimum_bytes": minimum,
    "minimum_terms": terms,
    "collective_ratio": total / minimum if minimum else (0.0 if total == 0 else float("inf")),
    "sliced_all_reduce_bytes": sliced,
    # A ring reduce-scatter sends half an all-reduce's bytes.
    "collective_ratio_reduce_scatter": (total - sliced / 2) / minimum if minimum else 0.0,
    "remat_warnings": log[0].count(REMAT_WARNING),
    "mesh": program.mesh_shape,
    "dispatch": cfg.model.moe.dispatch,
    "devices": n,
    "compile_seconds": seconds,
    "flops_per_device": float(compiled.cost_analysis().get("flops", 0.0)),
  }
  if single_device:
    flops = lambda c, d: float(
      training.program_for(c, d).lower().compile().cost_analysis()["flops"]
    )
    # XLA's cost analysis counts a loop body once: a scanned model's FLOPs are compared on its
    # per-layer twin (the same computation), on the mesh and on one device.
    per_layer = cfg.copy_and_resolve_references()
    per_layer.model.scan_layers = False
    if cfg.model.scan_layers:
      result["flops_per_device_per_layer_twin"] = flops(per_layer, devices)
    one = per_layer.copy_and_resolve_references()
    for axis in sharding.MESH_AXES:
      one.mesh[axis] = 1
    flops_one = flops(one, devices[:1])
    result["flops_single_device"] = flops_one
    mesh_flops = result.get("flops_per_device_per_layer_twin", result["flops_per_device"])
    result["replicated_work"] = mesh_flops * n / flops_one
  return result


def format_table(result: dict) -> str:
  gib = lambda b: f"{b / 2**20:.2f} MiB"
  lines = [
    f"mesh {result['mesh']} ({result['devices']} devices), dispatch {result['dispatch']}, "
    f"compiled in {result['compile_seconds']:.1f} s",
    "| collective | bytes per device per step |",
    "|---|---|",
  ]
  lines += [f"| {k} | {gib(v)} |" for k, v in result["collective_bytes"].items() if v]
  lines.append(f"| **total** | **{gib(result['total_bytes'])}** |")
  lines.append("")
  lines.append("| minimum term | bytes per device per step |")
  lines.append("|---|---|")
  lines += [f"| {k} | {gib(v)} |" for k, v in result["minimum_terms"].items() if v]
  lines.append(f"| **minimum** | **{gib(result['minimum_bytes'])}** |")
  lines.append("")
  lines.append(f"collective ratio (total / minimum): {result['collective_ratio']:.3f}")
  if result["sliced_all_reduce_bytes"]:
    lines.append(
      f"  of the all-reduce, {gib(result['sliced_all_reduce_bytes'])} is only sliced to the "
      "device's shard (a reduce-scatter on GPU): ratio counted that way "
      f"{result['collective_ratio_reduce_scatter']:.3f}"
    )
  if "replicated_work" in result:
    lines.append(
      f"replicated work (FLOPs x devices / 1-device FLOPs): {result['replicated_work']:.3f}"
    )
  lines.append(f"rematerialization warnings: {result['remat_warnings']}")
  return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
  """One row per (mesh, dispatch): bytes per kind (MiB), minimum, ratios, work, warnings."""
  mib = lambda b: f"{b / 2**20:.2f}"
  head = "| mesh | dispatch | all-to-all | all-gather | all-reduce | reduce-scatter | minimum |"
  lines = [
    head + " ratio | ratio, sliced all-reduce as reduce-scatter | replicated work | remat |",
    "|---" * 11 + "|",
  ]
  for r in results:
    mesh = ", ".join(f"{a} {n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    kinds = " | ".join(
      mib(r["collective_bytes"][k])
      for k in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter")
    )
    work = f"{r['replicated_work']:.3f}" if "replicated_work" in r else "-"
    lines.append(
      f"| {mesh} | {r['dispatch']} | {kinds} | {mib(r['minimum_bytes'])} | "
      f"{r['collective_ratio']:.3f} | {r['collective_ratio_reduce_scatter']:.3f} | {work} | "
      f"{r['remat_warnings']} |"
    )
  return "\n".join(lines)


def main():
  results = []
  for mesh in _MESHES:
    for dispatch in (_ARGS.dispatch or "").split(",") if _ARGS.dispatch else [None]:
      cfg = load_config(_ARGS.config)
      for axis in sharding.MESH_AXES:
        cfg.mesh[axis] = mesh.get(axis, 1)
      if dispatch:
        cfg.model.moe.dispatch = dispatch
      apply_overrides(cfg, _OVERRIDES)
      devices = jax.devices()[: _ARGS.devices or int(__import__("math").prod(mesh.values()))]
      results.append(measure(cfg, devices, single_device=not _ARGS.no_single))
      print(format_table(results[-1]), flush=True)
  if len(results) > 1:
    print("\nbytes per device per step in MiB\n" + summary_table(results))
  if _ARGS.json:
    with open(_ARGS.json, "w") as f:
      json.dump(results[0] if len(results) == 1 else results, f, indent=1)


if __name__ == "__main__":
  main()
