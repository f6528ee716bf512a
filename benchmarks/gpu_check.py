r"""The accelerator check, in one process: what docs/PERFORMANCE.md's GPU section reports.

  bash benchmarks/gpu_check.sh               # on the accelerator (installs carried wheels first)
  bash benchmarks/gpu_check.sh --cpu-smoke   # the same code at tiny sizes on CPU (a test runs it)

Prints markdown, one section at a time with its wall time:
1. the stack: Python, the versions of the required packages against requirements.txt, devices;
2. `jax.lax.ragged_dot` vs a dense matmul of the same rows ([M, K] x [K, N], M split into G
   equal groups): a grouped-matmul kernel costs about one dense matmul (ratio near 1), a masked
   dense lowering over all groups costs about G of them (ratio near G);
3. the train step of the `1b` size (benchmarks/train_step.py) in bfloat16 with the `capacity` and
   `dropless` dispatches and its dense twin: tokens/s, time / dense and MFU;
4. the MoE layer / dense FFN time of every dispatch at E 8/64/128, k 1/2
   (benchmarks/moe_layer.py; `dropless:ragged_dot` at every E on an accelerator).
Rows are printed as they are measured (the MoE layer rows on stderr until its table is whole),
so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import pathlib
import platform
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import mfu, moe_layer
from benchmarks import train_step as train_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISPATCHES = ("capacity", "dropless")

# Sizes per mode. ragged: rows M, K, N, groups G. moe_layer: its full default size (T 8192,
# D 512, d_ff 2048). train: `resize` applied to configs/switch_base.py:tiny.
FULL = SimpleNamespace(
  ragged=dict(rows=65536, k=2048, n=2048, groups=(8, 64), dtype=jnp.bfloat16, repeats=10),
  moe_layer=dict(
    tokens=8192,
    d_model=512,
    d_ff=2048,
    experts=[8, 64, 128],
    top_k=[1, 2],
    repeats=5,
    ragged_max_experts=128,
  ),
  resize=train_bench.resize_1b,
  train_repeats=5,
)
SMOKE = SimpleNamespace(
  ragged=dict(rows=512, k=64, n=64, groups=(4, 8), dtype=jnp.bfloat16, repeats=2),
  # E 8 and 128 only: E 64 runs the same code, and each row costs two compiles.
  moe_layer=dict(
    tokens=512,
    d_model=32,
    d_ff=64,
    experts=[8, 128],
    top_k=[1, 2],
    repeats=1,
    ragged_max_experts=8,
  ),
  resize=None,  # set below: resize_smoke
  train_repeats=1,
)


def resize_smoke(cfg):
  """The `1b` model's shape (every MLP an MoE, 16 experts top-2, dense twin of equal FLOPs) at a
  CPU size: 2 layers, d_model 64, batch 2 x 64 tokens."""
  cfg = train_bench.resize_1b(cfg)
  m, t = cfg.model, cfg.train
  m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.d_ff = 512, 2, 64, 4, 256
  m.moe.d_expert, m.moe.group_size = 128, 64
  t.batch_size, t.seq_len = 2, 64
  return cfg


SMOKE.resize = resize_smoke


@contextlib.contextmanager
def section(title: str):
  print(f"\n### {title}\n", flush=True)
  start = time.perf_counter()
  yield
  print(f"\n({title}: {time.perf_counter() - start:.0f} s)", flush=True)


def stack_report() -> list[str]:
  """Lines naming each requirement's installed version and whether requirements.txt admits it."""
  from packaging.requirements import Requirement

  lines = [
    f"Python {platform.python_version()}; jax {jax.__version__} on {jax.default_backend()}: "
    f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
    "",
    "| package | required | installed | |",
    "|---|---|---|---|",
  ]
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    req = Requirement(line)
    try:
      version = importlib.metadata.version(req.name)
      verdict = "ok" if req.specifier.contains(version, prereleases=True) else "OUT OF RANGE"
    except importlib.metadata.PackageNotFoundError:
      version, verdict = "-", "MISSING"
    lines.append(f"| {req.name} | {req.specifier} | {version} | {verdict} |")
  return lines


def ragged_dot_vs_dense(rows, k, n, groups, dtype, repeats):
  """Rows of (G, ms ragged_dot, ms dense, ratio, verdict); checks ragged_dot's values first.

  Shapes: lhs [M, K], rhs [G, K, N], M rows in G equal groups; the dense matmul is lhs @ rhs[0].
  """
  out = []
  key = jax.random.key(0)
  lhs_mk = jax.random.normal(key, (rows, k), jnp.float32).astype(dtype)
  dense = jax.jit(lambda a_mk, w_kn: a_mk @ w_kn)
  ragged = jax.jit(lambda a_mk, w_gkn, sizes_g: jax.lax.ragged_dot(a_mk, w_gkn, sizes_g))
  for g in groups:
    rhs_gkn = (jax.random.normal(jax.random.fold_in(key, g), (g, k, n)) / np.sqrt(k)).astype(dtype)
    sizes_g = jnp.full((g,), rows // g, jnp.int32)
    got = np.asarray(ragged(lhs_mk, rhs_gkn, sizes_g), np.float32)
    a, w = np.asarray(lhs_mk, np.float32), np.asarray(rhs_gkn, np.float32)
    m = rows // g
    want = np.concatenate([a[i * m : (i + 1) * m] @ w[i] for i in range(g)])
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0.05)  # bfloat16 inputs and output
    ragged_s, dense_s, ratio = moe_layer.paired_times(
      ragged, (lhs_mk, rhs_gkn, sizes_g), dense, (lhs_mk, rhs_gkn[0]), repeats
    )
    if ratio < 2:
      verdict = "grouped matmul (about one dense matmul)"
    elif ratio > g / 2:
      verdict = f"masked dense over all {g} groups (about G x the work)"
    else:
      verdict = "neither: between one and G dense matmuls"
    out.append((g, ragged_s * 1e3, dense_s * 1e3, ratio, verdict))
  return out


def train_table(resize, repeats):
  """Prints the train-step table row by row (a compile each): the dense twin, then each dispatch."""
  cfg = resize(train_bench.load_config(str(ROOT / "configs/switch_base.py") + ":tiny"))
  cfg.model.dtype = "bfloat16"
  m, tokens = cfg.model, cfg.train.batch_size * cfg.train.seq_len
  print(
    f"{m.num_layers} layers, d_model {m.d_model}, {m.moe.num_experts} experts top-"
    f"{m.moe.top_k} of width {m.moe.d_expert}, {mfu.active_matmul_params(cfg) / 1e6:.1f}M "
    f"active matmul parameters, {tokens} tokens per step, median of {repeats}\n"
  )
  print("| model | tok/s | time / dense | MFU |\n|---|---|---|---|", flush=True)
  device = jax.devices()[0].device_kind
  pct = lambda x: "n/a (peak unknown)" if x is None else f"{100 * x:.1f}%"
  dense = train_bench.dense_equivalent(cfg)
  dense_s = train_bench.seconds_per_step(dense, repeats)
  print(
    f"| dense twin | {tokens / dense_s:.0f} | 1.00 | "
    f"{pct(mfu.mfu(dense, tokens / dense_s, device))} |",
    flush=True,
  )
  for dispatch in DISPATCHES:
    cfg.model.moe.dispatch = dispatch
    moe_s = train_bench.seconds_per_step(cfg, repeats)
    print(
      f"| {dispatch} | {tokens / moe_s:.0f} | {moe_s / dense_s:.2f} | "
      f"{pct(mfu.mfu(cfg, tokens / moe_s, device))} |",
      flush=True,
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, on CPU")
  args = parser.parse_args(argv)
  sizes = SMOKE if args.cpu_smoke else FULL
  if args.cpu_smoke and jax.default_backend() != "cpu":
    raise SystemExit("--cpu-smoke runs on CPU: set JAX_PLATFORMS=cpu (gpu_check.sh does)")
  start = time.perf_counter()
  print(f"## moejax GPU check{' (CPU smoke: tiny sizes)' if args.cpu_smoke else ''}")

  with section("Stack"):
    print("\n".join(stack_report()))

  with section("jax.lax.ragged_dot vs a dense matmul of the same rows"):
    r = sizes.ragged
    print(
      f"M {r['rows']}, K {r['k']}, N {r['n']}, {jnp.dtype(r['dtype']).name}, equal groups; "
      "values checked against a per-group matmul\n"
    )
    print("| G | ms ragged_dot | ms dense | ragged / dense | runs as |\n|---|---|---|---|---|")
    for g, ragged_ms, dense_ms, ratio, verdict in ragged_dot_vs_dense(**r):
      print(f"| {g} | {ragged_ms:.3f} | {dense_ms:.3f} | {ratio:.2f} | {verdict} |", flush=True)

  with section("Train step, bfloat16 (benchmarks/train_step.py)"):
    train_table(sizes.resize, sizes.train_repeats)

  with section("MoE layer / dense FFN, every dispatch (benchmarks/moe_layer.py)"):
    layer_args = argparse.Namespace(dispatches=None, **sizes.moe_layer)
    print(
      f"T {layer_args.tokens}, D {layer_args.d_model}, d_ff {layer_args.d_ff}, float32, "
      f"median of {layer_args.repeats} alternating pairs\n"
    )
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines
      layer_rows, dense = moe_layer.run(layer_args)
    print(f"dense FFN fwd+bwd {dense['dense_ms_median']:.2f} ms\n")
    print(moe_layer.HEADER)
    for row in layer_rows:
      print(moe_layer.format_row(row))

  print(f"\ngpu_check done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
