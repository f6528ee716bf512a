r"""MoE layer cost vs a dense FFN of equal active FLOPs, per dispatch, as the expert count grows.

  python -m benchmarks.moe_layer [--quick] [--json OUT.json] [--tokens 8192 --d-model 512 ...]
  python -m benchmarks.moe_layer --quick --tokens 16384   # the quick sizes at more tokens

--tokens sets T alone (with or without --quick): rows per expert = T k cf / E grow with it, and
at large E they decide how efficient the per-expert matmuls are (docs/PERFORMANCE.md).
The process runs with huge-page malloc unless --system-malloc (comment above the jax import).

For E in {8, 64, 128} and k in {1, 2}: the expert hidden size is d_ff / k, so every (E, k)
does the same active matmul FLOPs per token as one dense FFN of hidden d_ff (parameters grow
with E, cost per token should not). Routing is Switch/top-k token choice on random tokens with
a learned-looking (random) router; capacity factor 1.25 for the capacity paths. Columns:

- time_ratio_vs_dense: fwd+bwd wall time (grads w.r.t. tokens, router and expert weights) of
  the MoE layer / the dense FFN, both jitted, on 1 device in this process: runs alternate
  dense, MoE, dense, MoE, ... after warm-up, and the median of the per-pair ratios is reported.
- flops_ratio_vs_ideal: XLA cost-analysis FLOPs of the fwd+bwd / ideal active FLOPs
  (3 x 2 x T x k x 2 x D x F/k). XLA counts a while-loop body once, so for the blocked dropless
  matmul (a scan) the ratio is the executed rows / valid pairs instead (`flops_source`).
- peak_mib: compiled peak memory of the fwd+bwd (XLA memory analysis).
- collective_ratio: on a {data: 2, expert: 4} mesh of simulated devices, bytes that leave a
  device in the forward pass's collectives (parsed from the compiled HLO) / the minimum for
  expert parallelism: each of the T*k token copies whose expert lives on another of the X
  expert shards goes there and back: 2 x T x k x D x 4 bytes x (X - 1) / X.

`all_to_all` runs the capacity path on one device (no exchange), so its time and FLOPs are
those of `capacity`; only its collective column is its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

# Large fresh buffers (the expert-weight gradients: 2 x E x D x F floats, 268 MB at E 128 of
# the quick size) are mmap'ed by glibc malloc on every call and page-faulted in 4 KiB pages:
# measured ~310 ms per call for 268 MB on the 2-core VM, more than the whole dense FFN fwd+bwd.
# With transparent huge pages for malloc's mmap chunks (glibc >= 2.35) it measured ~60 ms. The
# benchmark re-executes itself with that tunable (dense and MoE alike, same process) unless
# --system-malloc is given; the header says which. Other platforms ignore the variable.
if __name__ == "__main__":  # before jax is imported
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "--system-malloc" not in sys.argv and "glibc.malloc.hugetlb=1" not in tunables:
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.moe_layer", *sys.argv[1:]])
  # 8 simulated devices for the mesh column.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo_collectives
from moejax import sharding
from moejax.model import moe_layer
from moejax.model.experts import ExpertBank
from moejax.model.routers import top_k
from moejax.ops import capacity as capacity_ops
from moejax.ops import dropless, dropless_dispatch

CAPACITY_FACTOR = 1.25
GROUP_SIZE = 512  # 8 groups at the quick size: one per device of the mesh
MESH_SHAPE = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


def make_problem(tokens, d_model, d_ff, num_experts, k, seed=0):
  """Tokens [G, S, D], router weights [D, E] and an ExpertBank of hidden d_ff / k."""
  bank = ExpertBank(
    num_experts,
    d_model,
    d_ff // k,
    activation="gelu",
    init_std=0.02,
    out_std=0.02,
    rngs=nnx.Rngs(seed),
  )
  graphdef, bank_state = nnx.split(bank)
  rng = np.random.default_rng(seed)
  group = min(GROUP_SIZE, tokens)
  x_gsd = jnp.asarray(rng.normal(size=(tokens // group, group, d_model)), jnp.float32)
  w_router_de = jnp.asarray(rng.normal(size=(d_model, num_experts)) * 0.5, jnp.float32)
  return graphdef, bank_state, x_gsd, w_router_de


def route(x_gsd, w_router_de, k):
  """Top-k token-choice routing of every group (Switch for k = 1)."""
  logits_gse = jnp.einsum("gsd,de->gse", x_gsd, w_router_de)
  return jax.vmap(lambda l_se: top_k.route_top_k(l_se, top_k=k))(logits_gse)


def dispatch_fn(graphdef, dispatch, num_experts, capacity, grouped_matmul=None, rules=None):
  """(x [G, S, D], routing, expert state) -> y [G, S, D] through one dispatch."""
  fn = moe_layer.DISPATCHES[dispatch]
  if dispatch == "dropless":
    fn = functools.partial(dropless_dispatch.dropless_moe, grouped_matmul=grouped_matmul)

  def apply(x_gsd, routing, bank_state):
    bank = nnx.merge(graphdef, bank_state)
    return fn(x_gsd, routing, bank, num_experts=num_experts, capacity=capacity, rules=rules)[0]

  return apply


def moe_fwd(apply, k):
  """The whole layer: route, then dispatch; (x, router weights, expert state) -> y."""
  return lambda x_gsd, w_router_de, bank_state: apply(
    x_gsd, route(x_gsd, w_router_de, k), bank_state
  )


def dense_fwd(x_gsd, w_in_df, w_out_fd):
  """The dense FFN baseline, as 2-D matmuls over all tokens (the fastest form measured on CPU:
  a 3-D einsum's backward was ~1.7x slower)."""
  x_td = x_gsd.reshape(-1, x_gsd.shape[-1])
  return (jax.nn.gelu(x_td @ w_in_df) @ w_out_fd).reshape(x_gsd.shape)


def fwd_bwd(fwd):
  """Gradients of a scalar of the output w.r.t. every argument (tokens and weights)."""
  return jax.jit(jax.grad(lambda *args: jnp.sum(fwd(*args) ** 2), argnums=(0, 1, 2)))


def paired_times(fn, args, dense_fn, dense_args, repeats):
  """Median seconds of fn and of the dense baseline, and the median of their per-pair ratios.

  Runs alternate (dense, fn, dense, fn, ...) after a warm-up of each, so a load change on a
  shared machine hits both sides of a ratio alike.
  """
  for f, a in ((fn, args), (dense_fn, dense_args)):
    jax.block_until_ready(f(*a))  # compile + warm-up
    jax.block_until_ready(f(*a))
  times, dense_times = [], []
  for _ in range(repeats):
    for f, a, out in ((dense_fn, dense_args, dense_times), (fn, args, times)):
      start = time.perf_counter()
      jax.block_until_ready(f(*a))
      out.append(time.perf_counter() - start)
  ratios = [t / d for t, d in zip(times, dense_times, strict=True)]
  return statistics.median(times), statistics.median(dense_times), statistics.median(ratios)


def compiled_stats(fn, args):
  compiled = fn.lower(*args).compile()
  flops = float(compiled.cost_analysis().get("flops", float("nan")))
  return flops, compiled.memory_analysis().peak_memory_in_bytes, compiled


def mesh_collectives(dispatch_fn, x_gsd, routing, bank_state):
  """Collective bytes of one dispatch (forward) on the {data: 2, expert: 4} mesh.

  The routing is an input, sharded like the tokens (whole groups per device), so only the
  dispatch's own collectives are counted, not the router's.
  """
  devices = jax.devices()[:8]
  sizes = tuple(MESH_SHAPE[a] for a in sharding.MESH_AXES)
  mesh = jax.make_mesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)
  rules = sharding.DEFAULT
  groups = ("data", "fsdp", "expert")  # the batch (hence whole groups) is split over all three
  bank_shardings = jax.tree.map(
    lambda v: NamedSharding(mesh, rules.spec(sharding.param_axes(v))),
    bank_state,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  routing_sharding = jax.tree.map(
    lambda a: NamedSharding(mesh, P(groups, *([None] * (a.ndim - 1)))), routing
  )
  shardings = (NamedSharding(mesh, P(groups, None, None)), routing_sharding, bank_shardings)
  with jax.set_mesh(mesh):
    compiled = jax.jit(dispatch_fn, in_shardings=shardings).lower(x_gsd, routing, bank_state)
    compiled = compiled.compile()
  return hlo_collectives.collective_bytes(compiled.as_text(), len(devices))


def dropless_rows_ratio(routing, num_experts):
  """Executed rows of the blocked grouped matmul / valid pairs, for this routing."""
  block = dropless.block_rows(routing.expert_index.size, num_experts)
  _, _, used_q = dropless.blocked_layout(
    routing.expert_index.reshape(-1), routing.valid.reshape(-1), num_experts, block
  )
  return float(jnp.sum(used_q) * block / jnp.sum(routing.valid))


def run(args):
  rows = []
  t, d, f = args.tokens, args.d_model, args.d_ff
  ideal = 3 * 2 * t * 2 * d * f  # fwd + 2x bwd, two matmuls, active hidden d_ff
  rng = np.random.default_rng(1)
  dense_args = (
    jnp.asarray(rng.normal(size=(t // min(GROUP_SIZE, t), min(GROUP_SIZE, t), d)), jnp.float32),
    jnp.asarray(rng.normal(size=(d, f)) * 0.02, jnp.float32),
    jnp.asarray(rng.normal(size=(f, d)) * 0.02, jnp.float32),
  )
  dense_step = fwd_bwd(dense_fwd)
  dense_flops, dense_peak, _ = compiled_stats(dense_step, dense_args)
  dense_times = []
  print(f"dense XLA flops / ideal {dense_flops / ideal:.3f}", flush=True)
  for num_experts in args.experts:
    for k in args.top_k:
      graphdef, bank_state, x_gsd, w_router_de = make_problem(t, d, f, num_experts, k)
      problem = (x_gsd, w_router_de, bank_state)
      cap = capacity_ops.token_choice_capacity(x_gsd.shape[1], num_experts, k, CAPACITY_FACTOR)
      variants = [("capacity", None), ("dropless", "blocked"), ("all_to_all", None)]
      if num_experts <= args.ragged_max_experts:
        variants.append(("dropless", "ragged_dot"))
      if args.dispatches:
        variants = [v for v in variants if v[0] in args.dispatches]
      for dispatch, gm in variants:
        apply = dispatch_fn(graphdef, dispatch, num_experts, cap, gm)
        fwd = moe_fwd(apply, k)
        row = {
          "dispatch": dispatch if gm is None else f"{dispatch}:{gm}",
          "num_experts": num_experts,
          "top_k": k,
          "d_expert": f // k,
          "capacity": cap,
          "tokens": t,
          "d_model": d,
        }
        if dispatch != "all_to_all":
          step = fwd_bwd(fwd)
          flops, peak, _ = compiled_stats(step, problem)
          seconds, dense_s, ratio = paired_times(
            step, problem, dense_step, dense_args, args.repeats
          )
          dense_times.append(dense_s)
          row["time_ratio_vs_dense"] = ratio
          row["ms"], row["dense_ms"] = seconds * 1e3, dense_s * 1e3
          row["xla_flops"] = flops
          if gm == "blocked":
            row["flops_ratio_vs_ideal"] = dropless_rows_ratio(
              route(x_gsd, w_router_de, k), num_experts
            )
            row["flops_source"] = "executed rows / valid pairs"
          else:
            row["flops_ratio_vs_ideal"] = flops / ideal
            row["flops_source"] = "XLA cost analysis"
          row["peak_mib"] = peak / 2**20
        else:
          row.update(time_ratio_vs_dense=None, flops_ratio_vs_ideal=None)
        # The mesh column needs whole groups on each of the 8 devices (T >= 8 x 512).
        if len(jax.devices()) >= 8 and gm != "ragged_dot" and x_gsd.shape[0] % 8 == 0:
          x_shards = MESH_SHAPE["expert"]
          minimum = 2 * t * k * d * 4 * (x_shards - 1) / x_shards
          row["collective_ratio"] = (
            mesh_collectives(
              dispatch_fn(graphdef, dispatch, num_experts, cap, gm, rules=sharding.DEFAULT),
              x_gsd,
              route(x_gsd, w_router_de, k),
              bank_state,
            )
            / minimum
          )
        rows.append(row)
        print(format_row(row), flush=True)
  return rows, {
    "dense_ms_median": statistics.median(dense_times) * 1e3,
    "dense_ms_all": [s * 1e3 for s in dense_times],
    "dense_flops_ratio_vs_ideal": dense_flops / ideal,
    "dense_peak_mib": dense_peak / 2**20,
  }


HEADER = (
  "| dispatch | E | k | d_expert | C | ms fwd+bwd | time / dense | FLOPs / ideal | peak MiB | "
  "collective bytes / min |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r):
  fmt = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"
  return (
    f"| {r['dispatch']} | {r['num_experts']} | {r['top_k']} | {r['d_expert']} | "
    f"{r['capacity']} | {fmt(r.get('ms'), 0)} | {fmt(r['time_ratio_vs_dense'])} | "
    f"{fmt(r['flops_ratio_vs_ideal'])} | {fmt(r.get('peak_mib'), 0)} | "
    f"{fmt(r.get('collective_ratio'))} |"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="T 4096, D 256, F 1024, 3 repeats")
  parser.add_argument("--json", default=None, help="write the rows as a JSON list here")
  tokens_help = "T, tokens per step on the device (default 8192, --quick 4096; given wins)"
  parser.add_argument("--tokens", type=int, default=None, help=tokens_help)
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--d-ff", type=int, default=2048)
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
  parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=5)
  ragged_help = "ragged_dot is a masked dense matmul on CPU (E x cost): skip above this E"
  parser.add_argument("--ragged-max-experts", type=int, default=8, help=ragged_help)
  parser.add_argument("--dispatches", nargs="+", default=None, help="e.g. capacity dropless")
  parser.add_argument("--system-malloc", action="store_true", help="no huge pages (see top)")
  args = parser.parse_args()
  tokens = args.tokens
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.repeats = 4096, 256, 1024, 3
  args.tokens = tokens or args.tokens or 8192
  if args.tokens % min(GROUP_SIZE, args.tokens):
    parser.error(f"--tokens {args.tokens} must be a multiple of the group size {GROUP_SIZE}")
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; T={args.tokens} "
    f"D={args.d_model} d_ff={args.d_ff}; group size {min(GROUP_SIZE, args.tokens)}, "
    f"capacity factor {CAPACITY_FACTOR}, float32; GLIBC_TUNABLES="
    f"{os.environ.get('GLIBC_TUNABLES', '')!r}",
    flush=True,
  )
  start = time.perf_counter()
  rows, dense = run(args)
  all_ms = ", ".join(f"{m:.0f}" for m in dense["dense_ms_all"])
  print(
    f"\ndense FFN fwd+bwd median {dense['dense_ms_median']:.1f} ms (all: {all_ms}); XLA "
    f"FLOPs / ideal {dense['dense_flops_ratio_vs_ideal']:.3f}; peak "
    f"{dense['dense_peak_mib']:.0f} MiB\n"
  )
  print(HEADER)
  for r in rows:
    print(format_row(r))
  print(f"\n({time.perf_counter() - start:.0f} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
