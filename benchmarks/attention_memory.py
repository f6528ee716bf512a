r"""XLA temp memory of forward + backward: reference vs blockwise attention, full vs chunked loss.

  python -m benchmarks.attention_memory [--lengths 2048,4096,8192] [--heads 8 --kv_heads 2]

Compiles (does not run) `jax.value_and_grad` of each function on the default backend and prints
`compiled.memory_analysis().temp_size_in_bytes`, the scratch memory XLA plans for the step beyond
inputs and outputs, plus the growth from one length to the next. Reference attention builds
[B, H, L, M] scores (4x per doubling of L); blockwise attention keeps [block_q, block_k] tiles
(about 1x-2x per doubling). The loss part compares the full [T, V] logits with chunks of tokens.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from moejax.ops import attention, losses


def temp_bytes(fn, *shapes) -> int:
  """Temp bytes of jit(value_and_grad(sum(fn))) for inputs of the given ShapeDtypeStructs."""
  float_args = tuple(i for i, s in enumerate(shapes) if jnp.issubdtype(s.dtype, jnp.floating))
  step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), float_args))
  return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def attention_rows(lengths, batch, heads, kv_heads, head_dim, dtype):
  rows = []
  for length in lengths:
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype)
    ref = temp_bytes(attention.reference_attention, q, kv, kv)
    blk = temp_bytes(attention.blockwise_attention, q, kv, kv)
    rows.append((length, ref, blk))
  return rows


def loss_rows(tokens_list, d_model, vocab, chunk):
  rows = []
  for tokens in tokens_list:
    shapes = (
      jax.ShapeDtypeStruct((tokens, d_model), jnp.float32),
      jax.ShapeDtypeStruct((d_model, vocab), jnp.float32),
      jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    full = temp_bytes(losses.full_cross_entropy, *shapes)
    chunked = temp_bytes(
      lambda h, w, t: losses.chunked_cross_entropy(h, w, t, chunk=chunk), *shapes
    )
    rows.append((tokens, full, chunked))
  return rows


def print_table(title, names, rows):
  mib = lambda n: f"{n / 2**20:10.1f}"
  print(f"\n{title}")
  print(f"{'size':>8} " + " ".join(f"{n + ' MiB':>14} {'x prev':>7}" for n in names) + "  ratio")
  for i, (size, *values) in enumerate(rows):
    growth = [f"{v / rows[i - 1][j + 1]:7.2f}" if i else f"{'':7}" for j, v in enumerate(values)]
    cells = " ".join(f"{mib(v):>14} {g}" for v, g in zip(values, growth, strict=True))
    print(f"{size:>8} {cells}  {values[0] / values[1]:5.1f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="2048,4096,8192")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--chunk", type=int, default=1024)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  print(f"backend {jax.default_backend()}, jax {jax.__version__}; temp bytes of fwd+bwd")
  att = attention_rows(
    lengths, args.batch, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype)
  )
  print_table(
    f"attention B={args.batch} H={args.heads} G={args.kv_heads} K={args.head_dim} "
    f"{args.dtype} (L = M)",
    ("reference", "blockwise"),
    att,
  )
  tokens = [args.batch * n for n in lengths]
  print_table(
    f"cross-entropy D={args.d_model} V={args.vocab} chunk={args.chunk} float32 (T tokens)",
    ("full", "chunked"),
    loss_rows(tokens, args.d_model, args.vocab, args.chunk),
  )


if __name__ == "__main__":
  main()
